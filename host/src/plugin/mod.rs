//! Plugins and the chain an event runs through.
//!
//! A [`Plugin`] is one component, checked at load time against the world it exports
//! (`filter` or `transform`), pre-instantiated once, and given its own store. A [`Chain`] runs
//! a pipeline's plugins in order over one event and says what to publish, or why the event
//! must be dead-lettered. A plugin that fails many events in a row is quarantined (see
//! `config::QuarantineConfig`) until it is reloaded.

pub mod contract;
pub mod convert;
mod output;
pub mod reload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

use self::contract::v0_1::filter::{Filter, FilterPre};
use self::contract::v0_1::transform::{Transform, TransformPre};
use self::contract::v0_1::types as wit;
use self::output::check_outputs;
use crate::config::{
    Capabilities, PipelineConfig, PluginLimits, QuarantineAction, QuarantineConfig,
};
use crate::error::Error;
use crate::model::failure::FailureKind;
use crate::model::Change;
use crate::sandbox::{self, Admission, PluginState, Sandbox};

impl wit::Host for PluginState {}

impl contract::v0_1::filter::tidegate::plugin::log::Host for PluginState {
    /// One line, escaped (see `telemetry::escape`), within the call's log budget, tagged
    /// with the unit, tenant and plugin that wrote it.
    fn write(
        &mut self,
        level: contract::v0_1::filter::tidegate::plugin::log::Level,
        message: String,
    ) {
        use contract::v0_1::filter::tidegate::plugin::log::Level;
        let Some(admitted) = self.log_budget().admit(&message) else {
            return;
        };
        let message = crate::ops::telemetry::escape(admitted);
        let (pipeline, tenant) = (self.pipeline.as_str(), self.tenant.as_deref());
        let plugin = self.plugin.as_str();
        match level {
            Level::Debug => tracing::debug!(pipeline, tenant, plugin, "{message}"),
            Level::Info => tracing::info!(pipeline, tenant, plugin, "{message}"),
            Level::Warn => tracing::warn!(pipeline, tenant, plugin, "{message}"),
            Level::Error => tracing::error!(pipeline, tenant, plugin, "{message}"),
        }
    }
}

impl contract::v0_1::filter::tidegate::plugin::config::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn entries(&mut self) -> Vec<(String, String)> {
        self.config
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Which contract world a component implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    /// Keeps or drops events.
    Filter,
    /// Turns an event into zero or more events.
    Transform,
}

enum Pre {
    Filter(FilterPre<PluginState>),
    Transform(TransformPre<PluginState>),
}

enum Instance {
    Filter(Filter),
    Transform(Transform),
}

/// Everything a plugin is loaded with besides its file.
#[derive(Debug, Clone, Default)]
pub struct PluginSettings {
    /// The unit running it (pipeline id, or `<pipeline>.<tenant>`), for its log lines.
    pub pipeline: String,
    /// The tenant running it, if any, for its log lines.
    pub tenant: Option<String>,
    /// Its own key/values (what its `config` import returns).
    pub config: BTreeMap<String, String>,
    /// Limits of each call.
    pub limits: PluginLimits,
    /// What it may use beyond its memory.
    pub capabilities: Capabilities,
}

/// One loaded plugin with its (lazily re-created) instance.
pub struct Plugin {
    name: String,
    path: PathBuf,
    hash: String,
    world: World,
    settings: PluginSettings,
    engine: Engine,
    admission: Arc<Admission>,
    pre: Pre,
    live: Option<(Store<PluginState>, Instance)>,
    failures_in_a_row: u32,
    quarantined: bool,
    /// Fuel burnt by the last call (metrics, `tidegate plugin test`).
    last_fuel_used: u64,
    /// Most memory (all memories and tables together) an instance of this version held, in
    /// bytes.
    memory_peak: u64,
}

/// Why a plugin call produced no usable result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// The plugin's name.
    pub plugin: String,
    /// The plugin file's `sha256:<hex>`, naming the exact version that failed.
    pub plugin_hash: String,
    /// What went wrong, in the terms dead-letter headers and counters use.
    pub kind: FailureKind,
    /// Human-readable detail.
    pub message: String,
}

impl CallError {
    /// An error of `plugin` (name and hash); the message is escaped (see
    /// `telemetry::escape`) since it may carry text from the plugin into logs and headers.
    pub fn new(plugin: &str, plugin_hash: &str, kind: FailureKind, message: &str) -> CallError {
        CallError {
            plugin: plugin.to_string(),
            plugin_hash: plugin_hash.to_string(),
            kind,
            message: crate::ops::telemetry::escape(message).into_owned(),
        }
    }
}

impl Plugin {
    /// Loads, type-checks and initialises a plugin; any problem is an error naming the file.
    pub fn load(
        sandbox: &Sandbox,
        name: &str,
        path: &Path,
        settings: &PluginSettings,
    ) -> Result<Plugin, Error> {
        // Messages may quote the component (names, a plugin's `init` error): escaped.
        let fail = |message: String| Error::Plugin {
            name: name.to_string(),
            path: path.to_path_buf(),
            message: crate::ops::telemetry::escape(&message).into_owned(),
        };
        let bytes =
            std::fs::read(path).map_err(|err| fail(format!("cannot read the file: {err}")))?;
        if bytes.get(0..4) != Some(b"\0asm") {
            return Err(fail("not a WebAssembly file (no \\0asm header)".into()));
        }
        sandbox::check_declared(&bytes, &settings.limits).map_err(fail)?;
        let engine = sandbox.engine().clone();
        let compiled = sandbox.compile(&bytes).map_err(|err| {
            fail(format!(
                "not a valid WebAssembly component (a core module must be wrapped with \
                 `wasm-tools component new`): {err}"
            ))
        })?;
        let component: Component = compiled.component;
        let exports: Vec<String> = component
            .component_type()
            .exports(&engine)
            .map(|(export, _)| export.to_string())
            .collect();
        let world = if exports.iter().any(|e| e == "filter") {
            World::Filter
        } else if exports.iter().any(|e| e == "transform") {
            World::Transform
        } else {
            return Err(fail(format!(
                "exports neither `filter` nor `transform`, so it was not built for a \
                 tidegate:plugin@0.1.0 world (its exports: [{}])",
                exports.join(", ")
            )));
        };
        let mut linker: Linker<PluginState> = Linker::new(&engine);
        Filter::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |state| state)
            .map_err(|err| fail(format!("cannot set up imports: {err:#}")))?;
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|err| fail(format!("cannot set up WASI imports: {err:#}")))?;
        let instance_pre = linker.instantiate_pre(&component).map_err(|err| {
            fail(format!(
                "imports something tidegate does not grant (offered: tidegate:plugin/log, \
                 tidegate:plugin/config, and WASI 0.2 with only the capabilities the config \
                 grants): {err:#}"
            ))
        })?;
        let pre = match world {
            World::Filter => Pre::Filter(FilterPre::new(instance_pre).map_err(|err| {
                fail(format!(
                    "does not match the `filter` world of tidegate:plugin@0.1.0: {err:#}"
                ))
            })?),
            World::Transform => Pre::Transform(TransformPre::new(instance_pre).map_err(|err| {
                fail(format!(
                    "does not match the `transform` world of tidegate:plugin@0.1.0: {err:#}"
                ))
            })?),
        };
        let mut plugin = Plugin {
            name: name.to_string(),
            path: path.to_path_buf(),
            hash: compiled.hash,
            world,
            settings: settings.clone(),
            engine,
            admission: sandbox.admission(),
            pre,
            live: None,
            failures_in_a_row: 0,
            quarantined: false,
            last_fuel_used: 0,
            memory_peak: 0,
        };
        plugin.live = Some(plugin.instantiate().map_err(|err| fail(err.message))?);
        Ok(plugin)
    }

    /// The file's `sha256:<hex>`.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Whether the plugin is quarantined (not called until reloaded).
    pub fn is_quarantined(&self) -> bool {
        self.quarantined
    }

    /// Calls the plugin once on a synthetic event, then gives it a fresh instance, so a new
    /// version that traps on contact is refused before it replaces a working one. A
    /// `plugin-error` verdict passes: plugins may rightly reject an event they do not know.
    pub fn smoke_test(&mut self) -> Result<(), CallError> {
        let probe =
            convert::to_wit(&Change::probe()).map_err(|m| self.error(FailureKind::Encoding, m))?;
        match self.call(&probe) {
            Err(err) if err.kind != FailureKind::PluginError => return Err(err),
            _ => {}
        }
        self.fresh_instance()
    }

    /// Replaces the instance with a fresh one (`init` called), as happens after a trap.
    pub fn fresh_instance(&mut self) -> Result<(), CallError> {
        self.live = None;
        self.live = Some(self.instantiate()?);
        Ok(())
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The world it implements.
    pub fn world(&self) -> World {
        self.world
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Most memory (all memories and tables together) an instance of this version held, in
    /// bytes.
    pub fn memory_peak(&self) -> u64 {
        self.memory_peak
    }

    /// The limits of each call.
    pub fn limits(&self) -> &PluginLimits {
        &self.settings.limits
    }

    /// Fuel the last [`Plugin::call`] burnt (for `tidegate plugin test`).
    pub fn last_fuel_used(&self) -> u64 {
        self.last_fuel_used
    }

    fn error(&self, kind: FailureKind, message: impl AsRef<str>) -> CallError {
        CallError::new(&self.name, &self.hash, kind, message.as_ref())
    }

    /// Says once, after a call (or `init`), how much log output went over its budget.
    fn report_suppressed_logs(&self, store: &mut Store<PluginState>) {
        let (lines, bytes) = store.data_mut().log_budget().take_suppressed();
        if lines > 0 || bytes > 0 {
            tracing::warn!(
                pipeline = %self.settings.pipeline,
                tenant = self.settings.tenant.as_deref(),
                plugin = %self.name,
                suppressed_lines = lines,
                suppressed_bytes = bytes,
                "plugin log output over the per-call caps (limits.log_lines_per_call, \
                 limits.log_bytes_per_call) was suppressed"
            );
        }
    }

    /// A fresh instance, `init` already called.
    fn instantiate(&self) -> Result<(Store<PluginState>, Instance), CallError> {
        let limits = &self.settings.limits;
        let slot = self
            .admission
            .admit(limits)
            .map_err(|m| self.error(FailureKind::Admission, m))?;
        let wasi = sandbox::wasi_context(&self.settings.capabilities)
            .map_err(|m| self.error(FailureKind::Admission, m))?;
        let mut store = sandbox::new_store(
            &self.engine,
            &self.name,
            (&self.settings.pipeline, self.settings.tenant.as_deref()),
            &self.settings.config,
            limits,
            wasi,
            slot,
        );
        sandbox::arm(&mut store, limits).map_err(|m| self.error(FailureKind::Trap, m))?;
        let instance = match &self.pre {
            Pre::Filter(pre) => pre.instantiate(&mut store).map(Instance::Filter),
            Pre::Transform(pre) => pre.instantiate(&mut store).map(Instance::Transform),
        };
        let instance = instance.map_err(|err| {
            self.error(
                FailureKind::Trap,
                format!("instantiation failed: {}", sandbox::trap_reason(&err)),
            )
        })?;
        let init = match &instance {
            Instance::Filter(f) => f.call_init(&mut store),
            Instance::Transform(t) => t.call_init(&mut store),
        };
        self.report_suppressed_logs(&mut store);
        match init {
            Ok(Ok(())) => Ok((store, instance)),
            Ok(Err(err)) => Err(self.error(FailureKind::PluginError, plugin_error_text(&err))),
            Err(err) => Err(self.error(
                FailureKind::Trap,
                format!("init trapped: {}", sandbox::trap_reason(&err)),
            )),
        }
    }

    /// Runs the plugin on one event and checks what it returned the way production does
    /// ([`check_outputs`]): the one call-and-check path of the pipeline and of
    /// `tidegate plugin test`. `rules` are the unit's output rules.
    pub fn call_checked(
        &mut self,
        event: &wit::ChangeEvent,
        rules: &OutputRules,
    ) -> Result<Decision, CallError> {
        let decision = self.call(event)?;
        check_outputs(self, &decision, event, rules)?;
        Ok(decision)
    }

    /// Runs the plugin on one event. After a trap the instance is discarded (its memory may
    /// be half-updated) and the next call gets a fresh one.
    pub fn call(&mut self, event: &wit::ChangeEvent) -> Result<Decision, CallError> {
        let (mut store, instance) = match self.live.take() {
            Some(live) => live,
            None => self.instantiate()?,
        };
        sandbox::arm(&mut store, &self.settings.limits)
            .map_err(|m| self.error(FailureKind::Trap, m))?;
        let result = match &instance {
            Instance::Filter(f) => f
                .call_filter(&mut store, event)
                .map(|r| r.map(|keep| if keep { Decision::Keep } else { Decision::Drop })),
            Instance::Transform(t) => t
                .call_transform(&mut store, event)
                .map(|r| r.map(Decision::Replace)),
        };
        self.last_fuel_used = sandbox::fuel_used(&store, &self.settings.limits);
        self.memory_peak = self.memory_peak.max(store.data().memory_peak() as u64);
        self.report_suppressed_logs(&mut store);
        match result {
            Ok(Ok(decision)) => {
                self.live = Some((store, instance));
                Ok(decision)
            }
            Ok(Err(err)) => {
                self.live = Some((store, instance));
                Err(self.error(FailureKind::PluginError, plugin_error_text(&err)))
            }
            Err(err) => {
                let reason = sandbox::trap_reason(&err);
                Err(self.error(FailureKind::of_trap_reason(&reason), reason))
            }
        }
    }
}

/// What one plugin made of one event.
#[derive(Debug)]
pub enum Decision {
    /// A filter kept the event as it was.
    Keep,
    /// A filter dropped it.
    Drop,
    /// A transform replaced it with these outputs (none: dropped).
    Replace(Vec<wit::Output>),
}

fn plugin_error_text(err: &wit::PluginError) -> String {
    match err {
        wit::PluginError::InvalidEvent(m) => format!("invalid-event: {m}"),
        wit::PluginError::InvalidConfig(m) => format!("invalid-config: {m}"),
        wit::PluginError::Failed(m) => format!("failed: {m}"),
    }
}

/// One message the chain wants published.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The transformed change, or `None` for the original event, untouched (no plugin, or
    /// only filters): publishing it then needs no conversion at all.
    pub change: Option<Change>,
    /// Subject chosen by a plugin, if any.
    pub subject: Option<String>,
    /// Extra headers chosen by plugins.
    pub headers: Vec<(String, String)>,
}

/// Why an event goes to the dead-letter subject. A plugin's failure names the plugin (and
/// its version) in the dead letter's headers; the host's own reasons name none, rather than
/// a plugin with an empty name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterCause {
    /// A plugin's call failed.
    Plugin(CallError),
    /// The host could not carry the event (or an output) as it is.
    Host {
        /// What went wrong.
        kind: FailureKind,
        /// Human-readable detail.
        message: String,
    },
}

impl DeadLetterCause {
    /// What went wrong.
    pub fn kind(&self) -> FailureKind {
        match self {
            DeadLetterCause::Plugin(err) => err.kind,
            DeadLetterCause::Host { kind, .. } => *kind,
        }
    }

    /// Human-readable detail.
    pub fn message(&self) -> &str {
        match self {
            DeadLetterCause::Plugin(err) => &err.message,
            DeadLetterCause::Host { message, .. } => message,
        }
    }

    /// The plugin that failed, if one did.
    pub fn plugin(&self) -> Option<&CallError> {
        match self {
            DeadLetterCause::Plugin(err) => Some(err),
            DeadLetterCause::Host { .. } => None,
        }
    }
}

/// What the chain decided for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Publish these, in order (none: the event was filtered out).
    Publish(Vec<Output>),
    /// A plugin, or the host converting the event for plugins, failed: publish the original
    /// event to the dead-letter subject.
    DeadLetter(DeadLetterCause),
    /// A quarantined plugin's event, dropped by the `skip` policy.
    Skip(CallError),
    /// A quarantined plugin's event under the `halt` policy: the unit must stop before it.
    Halt(CallError),
    /// The event lies outside the tenant's namespaces (the server-side filter should have
    /// kept it away): no plugin saw it and nothing is published.
    OutOfScope,
}

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
        }
    }

    /// Makes the unit owe idle time for a call that broke a limit (see
    /// `QuarantineConfig::breach_pause`), so that a hostile plugin's CPU goes back to the
    /// other units instead of to its next event. The chain stage waits it out off the worker
    /// pool ([`Chain::take_pause`]), so no worker sits idle for it.
    fn pause_after_breach(&mut self, err: &CallError, took: std::time::Duration) {
        if !err.kind.is_limit_breach() || self.quarantine.breach_pause == 0 {
            return;
        }
        let pause = took
            .saturating_mul(self.quarantine.breach_pause)
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
        // The contract's form of the original (every chain's first plugin needs it).
        let sent = match self.plugins.is_empty() {
            true => None,
            false => match convert::to_wit(change) {
                Ok(event) => Some(event),
                Err(message) => {
                    return Verdict::DeadLetter(DeadLetterCause::Host {
                        kind: FailureKind::Encoding,
                        message,
                    })
                }
            },
        };
        // What flows down the chain; `None` is the original event, untouched so far.
        let mut current: Vec<Option<wit::Output>> = vec![None];
        for index in 0..self.plugins.len() {
            if let Some(verdict) = self.quarantined(index) {
                return verdict;
            }
            let mut next = Vec::with_capacity(current.len());
            for item in current {
                let input = match (&item, &sent) {
                    (Some(output), _) => &output.event,
                    (None, Some(sent)) => sent,
                    (None, None) => continue,
                };
                let plugin = &mut self.plugins[index];
                let started = std::time::Instant::now();
                let result = plugin.call_checked(input, &self.rules);
                if let Some(metrics) = self.metrics.get(index) {
                    metrics.call(
                        started.elapsed(),
                        plugin.last_fuel_used,
                        plugin.memory_peak,
                        result.is_err(),
                    );
                }
                self.record(index, result.as_ref().err());
                if let Err(err) = &result {
                    self.pause_after_breach(err, started.elapsed());
                }
                let outputs = match result {
                    Ok(Decision::Keep) => {
                        next.push(item);
                        continue;
                    }
                    Ok(Decision::Drop) => continue,
                    Ok(Decision::Replace(outputs)) => outputs,
                    Err(err) => return Verdict::DeadLetter(DeadLetterCause::Plugin(err)),
                };
                for mut out in outputs {
                    if let Some(earlier) = &item {
                        out.subject = out.subject.or_else(|| earlier.subject.clone());
                        let mut headers = earlier.headers.clone();
                        headers.append(&mut out.headers);
                        out.headers = headers;
                    }
                    next.push(Some(out));
                }
            }
            current = next;
        }
        let mut outputs = Vec::with_capacity(current.len());
        for item in current {
            let Some(out) = item else {
                outputs.push(Output {
                    change: None,
                    subject: None,
                    headers: Vec::new(),
                });
                continue;
            };
            // A transformed item exists only if the original was converted for a plugin.
            let Some(sent) = &sent else { continue };
            match convert::from_wit(out.event, sent, change) {
                Ok(changed) => outputs.push(Output {
                    change: Some(changed),
                    subject: out.subject,
                    headers: out.headers.into_iter().map(|h| (h.name, h.value)).collect(),
                }),
                Err(message) => {
                    let last = self
                        .plugins
                        .last()
                        .map(|p| (p.name.clone(), p.hash.clone()))
                        .unwrap_or_default();
                    return Verdict::DeadLetter(DeadLetterCause::Plugin(CallError::new(
                        &last.0,
                        &last.1,
                        FailureKind::InvalidOutput,
                        &message,
                    )));
                }
            }
        }
        Verdict::Publish(outputs)
    }
}
