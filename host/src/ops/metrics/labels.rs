//! Label sets and states: the identity of a series, fixed by the configuration so that the
//! number of series stays bounded.

/// The label set of a series, in a fixed order: `pipeline`, then e.g. `tenant`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Labels(pub(super) Vec<(&'static str, String)>);

impl Labels {
    /// The labels of a whole pipeline.
    pub fn pipeline(id: &str) -> Labels {
        Labels(vec![("pipeline", id.to_string())])
    }

    /// These labels plus one more (e.g. `tenant`).
    pub fn with(mut self, name: &'static str, value: &str) -> Labels {
        self.0.push((name, value.to_string()));
        self
    }

    /// The value of label `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `name="value",…` with Prometheus escaping.
    pub(super) fn render(&self) -> String {
        self.0
            .iter()
            .map(|(name, value)| format!("{name}=\"{}\"", escape(value)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

pub(super) fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What a pipeline is doing, for `/status` and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Connecting, loading the checkpoint, opening the change stream.
    Starting = 0,
    /// The change stream is open and events flow.
    Running = 1,
    /// MongoDB is unreachable or failed; retrying.
    Retrying = 2,
    /// Another instance holds the lease (high availability): deliberately idle.
    Standby = 3,
    /// Stopped (shutdown, or failed).
    Stopped = 4,
    /// A tenant whose plugins do not load: it reads nothing and keeps its checkpoint until a
    /// reload brings a chain that loads. Its own problem, not the instance's: `/readyz`
    /// leaves it out, so one tenant's bad plugin never makes the others' instance unready.
    Held = 5,
}

impl State {
    /// The name shown on `/status`.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Retrying => "retrying",
            State::Standby => "standby",
            State::Stopped => "stopped",
            State::Held => "held",
        }
    }

    pub(super) fn from_u8(n: u8) -> State {
        match n {
            1 => State::Running,
            2 => State::Retrying,
            3 => State::Standby,
            4 => State::Stopped,
            5 => State::Held,
            _ => State::Starting,
        }
    }
}
