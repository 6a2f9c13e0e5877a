//! Why an event could not be carried as it was: the kinds of failure, named the way
//! consumers read them. Dead letters carry the name in `Tidegate-Error-Kind`, the
//! `tidegate_dead_letters_total` counter in its `reason` label, logs in their `kind` field;
//! those values are an interface, so each kind's text is fixed here, once.

/// One kind of failure, a plugin's or the host's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The plugin used up its fuel for one call (`out-of-fuel`).
    OutOfFuel,
    /// The plugin ran past its time limit (`deadline`).
    Deadline,
    /// The plugin reached a memory or table limit (`memory`).
    Memory,
    /// The plugin trapped (`trap`).
    Trap,
    /// The plugin returned an error of its own (`plugin-error`).
    PluginError,
    /// The plugin's output breaks the contract (`invalid-output`).
    InvalidOutput,
    /// The plugin's outputs exceed its limits (`output-too-large`).
    OutputTooLarge,
    /// The plugin is quarantined (`quarantined`).
    Quarantined,
    /// The plugin could not be given an instance within the host's limits (`admission`).
    Admission,
    /// The event, or an output, cannot be encoded (`encoding`).
    Encoding,
    /// A framed message exceeds what the NATS server accepts (`too-large`).
    TooLarge,
    /// The event exceeds MongoDB's document limit and was stripped (`oversize`).
    Oversize,
    /// `format = "full-document"` and the event carries no document to publish
    /// (`missing-document`).
    MissingDocument,
}

impl FailureKind {
    /// Kinds a plugin's call dead-letters with, whose counters are declared at zero for every
    /// plugin (so dashboards see a series before the first failure).
    pub const PLUGIN_DECLARED: [FailureKind; 8] = [
        FailureKind::OutOfFuel,
        FailureKind::Deadline,
        FailureKind::Memory,
        FailureKind::Trap,
        FailureKind::PluginError,
        FailureKind::InvalidOutput,
        FailureKind::OutputTooLarge,
        FailureKind::Quarantined,
    ];

    /// Kinds the host dead-letters with itself, declared at zero with no plugin.
    pub const HOST_DECLARED: [FailureKind; 3] = [
        FailureKind::TooLarge,
        FailureKind::Encoding,
        FailureKind::MissingDocument,
    ];

    /// Whether the plugin broke one of its sandbox limits (fuel, deadline, memory, output
    /// size): the failures a hostile or runaway plugin repeats, and that cost CPU the other
    /// units need (see `QuarantineConfig::breach_pause`).
    pub const fn is_limit_breach(self) -> bool {
        matches!(
            self,
            FailureKind::OutOfFuel
                | FailureKind::Deadline
                | FailureKind::Memory
                | FailureKind::OutputTooLarge
        )
    }

    /// The kind's name in headers, metric labels and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            FailureKind::OutOfFuel => "out-of-fuel",
            FailureKind::Deadline => "deadline",
            FailureKind::Memory => "memory",
            FailureKind::Trap => "trap",
            FailureKind::PluginError => "plugin-error",
            FailureKind::InvalidOutput => "invalid-output",
            FailureKind::OutputTooLarge => "output-too-large",
            FailureKind::Quarantined => "quarantined",
            FailureKind::Admission => "admission",
            FailureKind::Encoding => "encoding",
            FailureKind::TooLarge => "too-large",
            FailureKind::Oversize => "oversize",
            FailureKind::MissingDocument => "missing-document",
        }
    }

    /// The kind of a failed call from its `sandbox::trap_reason`, whose text begins with
    /// `out-of-fuel`, `deadline`, `memory` or `trap`; anything else counts as a trap.
    pub fn of_trap_reason(reason: &str) -> FailureKind {
        match reason.split(':').next().unwrap_or_default() {
            "out-of-fuel" => FailureKind::OutOfFuel,
            "deadline" => FailureKind::Deadline,
            "memory" => FailureKind::Memory,
            _ => FailureKind::Trap,
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::FailureKind;

    /// The names consumers match on, exactly as they have always been published.
    #[test]
    fn names_are_stable() {
        let names: Vec<&str> = FailureKind::PLUGIN_DECLARED
            .iter()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "out-of-fuel",
                "deadline",
                "memory",
                "trap",
                "plugin-error",
                "invalid-output",
                "output-too-large",
                "quarantined"
            ]
        );
        assert_eq!(
            FailureKind::HOST_DECLARED.map(FailureKind::as_str),
            ["too-large", "encoding", "missing-document"]
        );
        assert_eq!(FailureKind::Oversize.to_string(), "oversize");
        assert_eq!(FailureKind::Admission.as_str(), "admission");
    }

    #[test]
    fn trap_reasons_name_their_kind() {
        assert_eq!(
            FailureKind::of_trap_reason("out-of-fuel"),
            FailureKind::OutOfFuel
        );
        assert_eq!(
            FailureKind::of_trap_reason("deadline"),
            FailureKind::Deadline
        );
        assert_eq!(
            FailureKind::of_trap_reason("memory: 64 MiB"),
            FailureKind::Memory
        );
        assert_eq!(FailureKind::of_trap_reason("memory"), FailureKind::Memory);
        assert_eq!(
            FailureKind::of_trap_reason("trap: unreachable"),
            FailureKind::Trap
        );
    }
}
