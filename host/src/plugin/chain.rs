//! A pipeline's plugins run in order over each event, whatever contract version each was
//! built against: the event travels in the form the last plugin left it, and is converted
//! only when the next plugin (or the publisher) needs another.

use std::path::Path;
use std::rc::Rc;

use super::contract::v0_1::types as wit;
use super::{
    convert, edit, CallError, DeadLetterCause, Decision, Input, Output, Payload, Plugin,
    PluginSettings, Verdict, Version,
};
use crate::config::{PipelineConfig, QuarantineAction, QuarantineConfig};
use crate::error::Error;
use crate::model::failure::FailureKind;
use crate::model::Change;
use crate::sandbox::{Sandbox, Strain};

/// What every output of a unit's transforms must respect besides the plugin's own limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRules {
    /// Subjects chosen by plugins must lie under `<subject_prefix>.`.
    pub subject_prefix: String,
    /// A cap on every plugin's `max_output_bytes`: the NATS server's `max_payload` once
    /// connected (`u64::MAX` until then).
    pub max_output_bytes: u64,
}

/// A pipeline's plugins, in order.
pub struct Chain {
    plugins: Vec<Plugin>,
    /// One series per plugin, in chain order.
    metrics: Vec<std::sync::Arc<crate::ops::metrics::PluginMetrics>>,
    rules: OutputRules,
    quarantine: QuarantineConfig,
    unit: String,
    /// Idle time owed for limit breaches (see [`Chain::take_pause`]).
    pause_owed: std::time::Duration,
    /// What the calls since the last [`Chain::take_strain`] cost beyond their CPU time.
    strain: Strain,
}

impl Chain {
    /// What `/status` shows of the chain's plugins: the exact versions running.
    pub fn infos(&self) -> Vec<crate::ops::metrics::PluginInfo> {
        self.plugins()
            .iter()
            .map(|p| crate::ops::metrics::PluginInfo {
                name: p.name().to_string(),
                world: format!("{:?}", p.world()).to_lowercase(),
                sha256: p.hash().trim_start_matches("sha256:").to_string(),
            })
            .collect()
    }

    /// Loads every plugin of a pipeline. Fails on the first plugin that cannot run.
    pub fn load(
        sandbox: &Sandbox,
        pipeline: &PipelineConfig,
        plugin_dir: &Path,
    ) -> Result<Chain, Error> {
        let plugins = pipeline
            .plugins
            .iter()
            .map(|p| {
                let path = PipelineConfig::plugin_path(p, plugin_dir);
                Plugin::load(sandbox, &p.name, &path, &Chain::settings(pipeline, p))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Chain::of(plugins, pipeline))
    }

    /// A chain of already loaded `plugins` for `pipeline` (`tidegate plugin test` builds its
    /// one-plugin chain this way).
    pub fn of(plugins: Vec<Plugin>, pipeline: &PipelineConfig) -> Chain {
        let labels = crate::ops::metrics::unit_labels(&pipeline.id);
        Chain {
            metrics: plugins
                .iter()
                .map(|p| crate::ops::metrics::plugin(&labels, p.name()))
                .collect(),
            plugins,
            rules: OutputRules {
                subject_prefix: pipeline.sink.subject_prefix.clone(),
                max_output_bytes: u64::MAX,
            },
            quarantine: pipeline.quarantine,
            unit: pipeline.id.clone(),
            pause_owed: std::time::Duration::ZERO,
            strain: Strain::default(),
        }
    }

    /// Makes the unit owe idle time for a call that broke a limit (see
    /// `QuarantineConfig::breach_pause`), so that a hostile plugin's CPU goes back to the
    /// other units instead of to its next event. The chain stage waits it out off the worker
    /// pool ([`Chain::take_pause`]), so no worker sits idle for it.
    ///
    /// In a run of failures of the plugin (`in_a_row`, counted by [`Chain::record`]) the
    /// pause also doubles with each one, up to [`crate::config::FAILED_RUN_PAUSE`]: a pause in
    /// proportion to the call bounds the plugin's CPU, but not what each of its failed events
    /// costs outside the call (the change stream reading it, the dead letter framed,
    /// published and stored), which for a cheap call such as a header bomb's is most of it
    /// (measured: ~2 ms of the machine's CPU per event, at a few hundred events a second).
    /// The doubling stops at a tenth of a second, so it bounds the rate of such events and
    /// never lengthens the pause of a costly call: a hog reaches quarantine as soon as
    /// before. One call that does not fail ends the run.
    fn pause_after_breach(&mut self, err: &CallError, took: std::time::Duration, in_a_row: u32) {
        if !err.kind.is_limit_breach() {
            return;
        }
        self.strain.breached = true;
        if self.quarantine.breach_pause == 0 {
            return;
        }
        let proportional = took.saturating_mul(self.quarantine.breach_pause);
        // 2^16 times any call is past the cap; the shift stays in range.
        let doublings = in_a_row.saturating_sub(1).min(16);
        let doubled = proportional
            .saturating_mul(1 << doublings)
            .min(crate::config::FAILED_RUN_PAUSE);
        let pause = proportional
            .max(doubled)
            .min(crate::config::MAX_BREACH_PAUSE);
        self.pause_owed = self
            .pause_owed
            .saturating_add(pause)
            .min(crate::config::MAX_BREACH_PAUSE);
    }

    /// The idle time the unit owes for limit breaches since the last call of this (see
    /// `QuarantineConfig::breach_pause`), at most [`crate::config::MAX_BREACH_PAUSE`].
    pub fn take_pause(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.pause_owed)
    }

    /// Whether a call broke a plugin limit since the last call of this (the worker pool runs
    /// such a unit at the lowest priority beside others: see `sandbox::fair`), and how long
    /// the calls' waits blocked (charged as CPU time).
    pub fn take_strain(&mut self) -> Strain {
        std::mem::take(&mut self.strain)
    }

    /// Whether a limit breach left idle time owed (see [`Chain::take_pause`]).
    pub fn owes_pause(&self) -> bool {
        !self.pause_owed.is_zero()
    }

    /// Caps every plugin's `max_output_bytes` at `max` (the NATS server's `max_payload`).
    pub fn cap_output_bytes(&mut self, max: u64) {
        self.rules.max_output_bytes = max;
    }

    /// What plugin `p` of `pipeline` is loaded with.
    pub fn settings(pipeline: &PipelineConfig, p: &crate::config::PluginConfig) -> PluginSettings {
        PluginSettings {
            pipeline: pipeline.id.clone(),
            tenant: pipeline.tenant.as_ref().map(|t| t.id.clone()),
            config: p.config.clone(),
            limits: pipeline.plugin_limits(p),
            capabilities: pipeline.capabilities.clone(),
        }
    }

    /// The loaded plugins.
    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    /// Puts a new version of the plugin at `index` in place, between two events. Its
    /// failure count and any quarantine start afresh.
    pub fn replace(&mut self, index: usize, plugin: Plugin) -> Option<Plugin> {
        let slot = self.plugins.get_mut(index)?;
        Some(std::mem::replace(slot, plugin))
    }

    /// Runs every plugin once on a synthetic event (see [`Plugin::smoke_test`]).
    pub fn smoke_test(&mut self) -> Result<(), CallError> {
        self.plugins.iter_mut().try_for_each(Plugin::smoke_test)
    }

    /// Records the outcome of one call of plugin `index`, quarantining it when it has failed
    /// too often in a row.
    fn record(&mut self, index: usize, failed: Option<&CallError>) {
        let after = self.quarantine.after_failures;
        let Some(plugin) = self.plugins.get_mut(index) else {
            return;
        };
        let Some(err) = failed else {
            plugin.failures_in_a_row = 0;
            return;
        };
        plugin.failures_in_a_row += 1;
        if after > 0 && plugin.failures_in_a_row >= after && !plugin.quarantined {
            plugin.quarantined = true;
            tracing::error!(
                pipeline = %self.unit,
                plugin = %plugin.name,
                hash = %plugin.hash,
                failures = plugin.failures_in_a_row,
                last_error = %err.message,
                action = ?self.quarantine.action,
                "plugin quarantined: it is no longer called. Release it by replacing {} (it is \
                 reloaded automatically) or by sending SIGHUP",
                plugin.path.display()
            );
        }
    }

    /// What a quarantined plugin's event becomes.
    fn quarantined(&self, index: usize) -> Option<Verdict> {
        let plugin = self.plugins.get(index).filter(|p| p.quarantined)?;
        let err = plugin.error(
            FailureKind::Quarantined,
            format!(
                "plugin failed {} events in a row and is quarantined until reloaded",
                plugin.failures_in_a_row
            ),
        );
        Some(match self.quarantine.action {
            QuarantineAction::DeadLetter => Verdict::DeadLetter(DeadLetterCause::Plugin(err)),
            QuarantineAction::Skip => Verdict::Skip(err),
            QuarantineAction::Halt => Verdict::Halt(err),
        })
    }

    /// Runs the chain over one change of a unit whose scope check `may_see` is already done.
    pub fn run(&mut self, change: &Change) -> Verdict {
        if self.plugins.is_empty() {
            return Verdict::Publish(vec![Output {
                change: None,
                subject: None,
                headers: Vec::new(),
                payload: None,
            }]);
        }
        let original = Rc::new(Input::new(change.clone()));
        let mut current = vec![Item {
            form: Form::Host(Rc::clone(&original)),
            subject: None,
            headers: Vec::new(),
            payload: None,
        }];
        for index in 0..self.plugins.len() {
            if let Some(verdict) = self.quarantined(index) {
                return verdict;
            }
            let mut next = Vec::with_capacity(current.len());
            for item in current {
                if let Err(verdict) = self.step(index, item, &mut next) {
                    return verdict;
                }
            }
            current = next;
        }
        let mut outputs = Vec::with_capacity(current.len());
        for item in current {
            let changed = match item.form {
                Form::Host(input) if Rc::ptr_eq(&input, &original) => None,
                form => match form.into_host() {
                    Ok(input) => Some(input.change().clone()),
                    Err(message) => return Verdict::DeadLetter(self.last_plugin_error(message)),
                },
            };
            outputs.push(Output {
                change: changed,
                subject: item.subject,
                headers: item.headers,
                payload: item.payload,
            });
        }
        Verdict::Publish(outputs)
    }

    /// The error of an output the host could not carry, charged to the chain's last plugin.
    fn last_plugin_error(&self, message: String) -> DeadLetterCause {
        let (name, hash) = self
            .plugins
            .last()
            .map(|p| (p.name.clone(), p.hash.clone()))
            .unwrap_or_default();
        DeadLetterCause::Plugin(CallError::new(
            &name,
            &hash,
            FailureKind::InvalidOutput,
            &message,
        ))
    }

    /// Runs plugin `index` on one item, pushing what it becomes onto `next`; `Err` is the
    /// verdict that ends the chain (a dead letter).
    fn step(&mut self, index: usize, item: Item, next: &mut Vec<Item>) -> Result<(), Verdict> {
        let plugin = &mut self.plugins[index];
        // A 0.2 plugin reads the change itself: an event still in 0.1's form becomes one.
        let item = match (&item.form, plugin.version()) {
            (Form::Wit { .. }, Version::V0_2) => {
                let form = match item.form.into_host() {
                    Ok(input) => Form::Host(input),
                    Err(message) => {
                        let err = plugin.error(FailureKind::InvalidOutput, message);
                        return Err(Verdict::DeadLetter(DeadLetterCause::Plugin(err)));
                    }
                };
                Item { form, ..item }
            }
            _ => item,
        };
        let started = std::time::Instant::now();
        let result = match &item.form {
            Form::Host(input) => plugin.call_checked(input, &self.rules),
            Form::Wit { event, .. } => plugin.call_checked_v0_1(event, &self.rules),
        };
        if let Some(metrics) = self.metrics.get(index) {
            metrics.call(
                started.elapsed(),
                plugin.last_fuel_used,
                plugin.memory_peak,
                result.is_err(),
            );
        }
        self.strain.waited += self.plugins[index].last_waited;
        self.record(index, result.as_ref().err());
        if let Err(err) = &result {
            let in_a_row = self.plugins[index].failures_in_a_row;
            self.pause_after_breach(err, started.elapsed(), in_a_row);
        }
        match result {
            Ok(Decision::Keep) => next.push(item),
            Ok(Decision::Drop) => {}
            Ok(Decision::Replace(outputs)) => {
                let base = match &item.form {
                    Form::Host(input) => Rc::clone(input),
                    Form::Wit { base, .. } => Rc::clone(base),
                };
                for out in outputs {
                    let (subject, headers) = item.route(
                        out.subject,
                        out.headers.into_iter().map(|h| (h.name, h.value)),
                    );
                    next.push(Item {
                        form: Form::Wit {
                            event: Box::new(out.event),
                            base: Rc::clone(&base),
                        },
                        subject,
                        headers,
                        payload: item.payload.clone(),
                    });
                }
            }
            Ok(Decision::Edit(outputs)) => {
                let Form::Host(input) = &item.form else {
                    return Ok(());
                };
                for out in outputs {
                    let form = match edit::apply(input.change(), &out) {
                        Ok(None) => Form::Host(Rc::clone(input)),
                        Ok(Some(changed)) => Form::Host(Rc::new(Input::new(changed))),
                        Err(message) => {
                            let plugin = &self.plugins[index];
                            let err = plugin.error(FailureKind::InvalidOutput, message);
                            return Err(Verdict::DeadLetter(DeadLetterCause::Plugin(err)));
                        }
                    };
                    let (subject, headers) = item.route(
                        out.subject,
                        out.headers.into_iter().map(|h| (h.name, h.value)),
                    );
                    let payload = match out.payload {
                        Some(p) => Some(Payload {
                            bytes: p.bytes,
                            content_type: p.content_type,
                        }),
                        None => item.payload.clone(),
                    };
                    next.push(Item {
                        form,
                        subject,
                        headers,
                        payload,
                    });
                }
            }
            Err(err) => return Err(Verdict::DeadLetter(DeadLetterCause::Plugin(err))),
        }
        Ok(())
    }
}

/// One event on its way down the chain, with the routing (and any payload) plugins gave it
/// so far.
struct Item {
    form: Form,
    subject: Option<String>,
    headers: Vec<(String, String)>,
    /// Like the subject, a later transform's payload replaces an earlier one's.
    payload: Option<Payload>,
}

impl Item {
    /// An output's subject and headers after this item's: a transform's own subject wins,
    /// headers add up in chain order.
    fn route(
        &self,
        subject: Option<String>,
        headers: impl Iterator<Item = (String, String)>,
    ) -> (Option<String>, Vec<(String, String)>) {
        let mut all = self.headers.clone();
        all.extend(headers);
        (subject.or_else(|| self.subject.clone()), all)
    }
}

/// The event in the form the last plugin left it: kept in 0.1's form between 0.1 plugins,
/// so a chain of them converts the documents once, not at every step.
enum Form {
    /// A change (the original, or one 0.2 edits made).
    Host(Rc<Input>),
    /// What a 0.1 transform returned, with the input it was given (to convert it back
    /// against: untouched values keep their BSON).
    Wit {
        event: Box<wit::ChangeEvent>,
        base: Rc<Input>,
    },
}

impl Form {
    /// The change this form describes.
    fn into_host(self) -> Result<Rc<Input>, String> {
        match self {
            Form::Host(input) => Ok(input),
            Form::Wit { event, base } => {
                let sent = base.v0_1()?;
                let changed = convert::from_wit(*event, sent, base.change())?;
                Ok(Rc::new(Input::new(changed)))
            }
        }
    }
}
