//! Plugins and the chain an event runs through.
//!
//! A [`Plugin`] is one component, checked at load time against the world it exports
//! (`filter` or `transform`), pre-instantiated once, and given its own store. A [`Chain`] runs
//! a pipeline's plugins in order over one event and says what to publish, or why the event
//! must be dead-lettered. A plugin that fails many events in a row is quarantined (see
//! `config::QuarantineConfig`) until it is reloaded.
//!
//! Components of every released contract version load side by side ([`contract`]): a 0.1
//! plugin is handed the event with its documents as Extended JSON ([`convert`]), a 0.2 plugin
//! its metadata, reading documents in place through the `event` import ([`imports`], [`path`])
//! and answering with edits the host applies to the raw BSON ([`edit`]). An [`Input`] makes
//! each form once per event, however many plugins use it.

mod chain;
mod check;
pub mod contract;
pub mod convert;
pub mod edit;
mod imports;
pub mod path;
pub mod reload;

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

pub use self::chain::{Chain, OutputRules};
use self::contract::v0_1::filter::{Filter, FilterPre};
use self::contract::v0_1::transform::{Transform, TransformPre};
use self::contract::v0_1::types as wit;
use self::contract::v0_2;
pub use self::contract::Version;
use crate::config::{Capabilities, PluginLimits};
use crate::error::Error;
use crate::model::failure::FailureKind;
use crate::model::Change;
use crate::sandbox::{self, Admission, PluginState, Sandbox};

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
    Filter02(v0_2::filter::FilterPre<PluginState>),
    Transform02(v0_2::transform::TransformPre<PluginState>),
}

enum Instance {
    Filter(Filter),
    Transform(Transform),
    Filter02(v0_2::filter::Filter),
    Transform02(v0_2::transform::Transform),
}

/// One event as plugins are given it: the change, and its form for each contract version,
/// each made once, on first use, however many plugins of that version see it.
pub struct Input {
    change: Arc<Change>,
    v0_1: OnceCell<Result<wit::ChangeEvent, String>>,
    v0_2: OnceCell<v0_2::types::ChangeEvent>,
}

impl Input {
    /// An input for `change`.
    pub fn new(change: Change) -> Input {
        Input::shared(Arc::new(change))
    }

    fn shared(change: Arc<Change>) -> Input {
        Input {
            change,
            v0_1: OnceCell::new(),
            v0_2: OnceCell::new(),
        }
    }

    /// The change.
    pub fn change(&self) -> &Change {
        &self.change
    }

    /// Contract 0.1's form (documents converted to relaxed Extended JSON). Fails only on
    /// malformed BSON.
    pub fn v0_1(&self) -> Result<&wit::ChangeEvent, String> {
        self.v0_1
            .get_or_init(|| convert::to_wit(&self.change))
            .as_ref()
            .map_err(String::clone)
    }

    /// Contract 0.2's form: the metadata only.
    pub fn v0_2(&self) -> &v0_2::types::ChangeEvent {
        self.v0_2.get_or_init(|| edit::metadata(&self.change))
    }
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
    version: Version,
    settings: PluginSettings,
    engine: Engine,
    admission: Arc<Admission>,
    pre: Pre,
    live: Option<(Store<PluginState>, Instance)>,
    failures_in_a_row: u32,
    quarantined: bool,
    /// Fuel burnt by the last call (metrics, `tidegate plugin test`).
    last_fuel_used: u64,
    /// How long the last call's waits blocked (charged on the worker pool as CPU time).
    last_waited: std::time::Duration,
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
        let Some((world, version)) = contract::identify(&exports) else {
            return Err(fail(format!(
                "exports neither `filter` nor `transform` (0.1) nor `{}` / `{}` (0.2), so it \
                 was not built for a tidegate:plugin world (its exports: [{}])",
                v0_2::FILTER_EXPORT,
                v0_2::TRANSFORM_EXPORT,
                exports.join(", ")
            )));
        };
        let pre = prepare(&engine, &component, world, version).map_err(fail)?;
        let mut plugin = Plugin {
            name: name.to_string(),
            path: path.to_path_buf(),
            hash: compiled.hash,
            world,
            version,
            settings: settings.clone(),
            engine,
            admission: sandbox.admission(),
            pre,
            live: None,
            failures_in_a_row: 0,
            quarantined: false,
            last_fuel_used: 0,
            last_waited: std::time::Duration::ZERO,
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
        let probe = Input::new(Change::probe());
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
            Pre::Filter02(pre) => pre.instantiate(&mut store).map(Instance::Filter02),
            Pre::Transform02(pre) => pre.instantiate(&mut store).map(Instance::Transform02),
        };
        let instance = instance.map_err(|err| {
            self.error(
                FailureKind::Trap,
                format!("instantiation failed: {}", sandbox::trap_reason(&err)),
            )
        })?;
        let init = match &instance {
            Instance::Filter(f) => f.call_init(&mut store).map(|r| r.map_err(|e| e.text())),
            Instance::Transform(t) => t.call_init(&mut store).map(|r| r.map_err(|e| e.text())),
            Instance::Filter02(f) => f
                .tidegate_plugin_filter_api()
                .call_init(&mut store)
                .map(|r| r.map_err(|e| e.text())),
            Instance::Transform02(t) => t
                .tidegate_plugin_transform_api()
                .call_init(&mut store)
                .map(|r| r.map_err(|e| e.text())),
        };
        self.report_suppressed_logs(&mut store);
        match init {
            Ok(Ok(())) => Ok((store, instance)),
            Ok(Err(err)) => Err(self.error(FailureKind::PluginError, err)),
            Err(err) => Err(self.error(
                FailureKind::Trap,
                format!("init trapped: {}", sandbox::trap_reason(&err)),
            )),
        }
    }

    /// Runs the plugin on one event and checks what it returned the way production does
    /// (`check::check_outputs`): the one call-and-check path of the pipeline and of
    /// `tidegate plugin test`. `rules` are the unit's output rules.
    pub fn call_checked(
        &mut self,
        input: &Input,
        rules: &OutputRules,
    ) -> Result<Decision, CallError> {
        let decision = self.call(input)?;
        check::check_outputs(self, &decision, input.change().id(), rules)?;
        Ok(decision)
    }

    /// [`Plugin::call_checked`] for an event already in contract 0.1's form (what a 0.1
    /// transform handed the chain). Only for 0.1 plugins.
    fn call_checked_v0_1(
        &mut self,
        event: &wit::ChangeEvent,
        rules: &OutputRules,
    ) -> Result<Decision, CallError> {
        let decision = self.invoke(Arg::V0_1(event))?;
        check::check_outputs(self, &decision, &event.id, rules)?;
        Ok(decision)
    }

    /// The contract version the component was built against.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Runs the plugin on one event, in the form its contract version takes. After a trap
    /// the instance is discarded (its memory may be half-updated) and the next call gets a
    /// fresh one.
    pub fn call(&mut self, input: &Input) -> Result<Decision, CallError> {
        match self.version {
            Version::V0_1 => {
                let event = input
                    .v0_1()
                    .map_err(|m| self.error(FailureKind::Encoding, m))?;
                self.invoke(Arg::V0_1(event))
            }
            Version::V0_2 => self.invoke(Arg::V0_2(&input.change, input.v0_2())),
        }
    }

    fn invoke(&mut self, arg: Arg<'_>) -> Result<Decision, CallError> {
        self.last_waited = std::time::Duration::ZERO;
        let (mut store, instance) = match self.live.take() {
            Some(live) => live,
            None => self.instantiate()?,
        };
        sandbox::arm(&mut store, &self.settings.limits)
            .map_err(|m| self.error(FailureKind::Trap, m))?;
        let keep = |keep: bool| if keep { Decision::Keep } else { Decision::Drop };
        let result = match (&instance, arg) {
            (Instance::Filter(f), Arg::V0_1(event)) => f
                .call_filter(&mut store, event)
                .map(|r| r.map(keep).map_err(|e| e.text())),
            (Instance::Transform(t), Arg::V0_1(event)) => t
                .call_transform(&mut store, event)
                .map(|r| r.map(Decision::Replace).map_err(|e| e.text())),
            (Instance::Filter02(f), Arg::V0_2(change, meta)) => {
                store.data_mut().event = Some(Arc::clone(change));
                let result = f.tidegate_plugin_filter_api().call_filter(&mut store, meta);
                store.data_mut().event = None;
                result.map(|r| r.map(keep).map_err(|e| e.text()))
            }
            (Instance::Transform02(t), Arg::V0_2(change, meta)) => {
                store.data_mut().event = Some(Arc::clone(change));
                let result = t
                    .tidegate_plugin_transform_api()
                    .call_transform(&mut store, meta);
                store.data_mut().event = None;
                result.map(|r| r.map(Decision::Edit).map_err(|e| e.text()))
            }
            _ => {
                self.live = Some((store, instance));
                return Err(self.error(
                    FailureKind::Encoding,
                    "the host handed the plugin an event in another contract version's form",
                ));
            }
        };
        self.last_fuel_used = sandbox::fuel_used(&store, &self.settings.limits);
        self.last_waited = store.data_mut().take_waited();
        self.memory_peak = self.memory_peak.max(store.data().memory_peak() as u64);
        self.report_suppressed_logs(&mut store);
        match result {
            Ok(Ok(decision)) => {
                self.live = Some((store, instance));
                Ok(decision)
            }
            Ok(Err(err)) => {
                self.live = Some((store, instance));
                Err(self.error(FailureKind::PluginError, err))
            }
            Err(err) => {
                let reason = sandbox::trap_reason(&err);
                Err(self.error(FailureKind::of_trap_reason(&reason), reason))
            }
        }
    }
}

/// An event in the form a plugin's contract version takes.
#[derive(Clone, Copy)]
enum Arg<'a> {
    V0_1(&'a wit::ChangeEvent),
    V0_2(&'a Arc<Change>, &'a v0_2::types::ChangeEvent),
}

/// Links a component against the imports of its contract version (and WASI) and checks it
/// against its world's exports, once, so that instantiating it later type-checks nothing.
fn prepare(
    engine: &Engine,
    component: &Component,
    world: World,
    version: Version,
) -> Result<Pre, String> {
    let mut linker: Linker<PluginState> = Linker::new(engine);
    let linked = match version {
        Version::V0_1 => {
            Filter::add_to_linker::<PluginState, HasSelf<PluginState>>(&mut linker, |s| s)
        }
        Version::V0_2 => v0_2::filter::Filter::add_to_linker::<PluginState, HasSelf<PluginState>>(
            &mut linker,
            |s| s,
        ),
    };
    linked.map_err(|err| format!("cannot set up imports: {err:#}"))?;
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
        .and_then(|()| sandbox::link_waits(&mut linker))
        .map_err(|err| format!("cannot set up WASI imports: {err:#}"))?;
    let instance_pre = linker.instantiate_pre(component).map_err(|err| {
        format!(
            "imports something tidegate does not grant (offered to a {} component: \
             tidegate:plugin/log, tidegate:plugin/config{}, and WASI 0.2 with only the \
             capabilities the config grants): {err:#}",
            version.as_str(),
            if version == Version::V0_2 {
                ", tidegate:plugin/event"
            } else {
                ""
            }
        )
    })?;
    let mismatch = |err: wasmtime::Error| {
        format!(
            "does not match the `{}` world of tidegate:plugin@{}: {err:#}",
            format!("{world:?}").to_lowercase(),
            version.as_str()
        )
    };
    Ok(match (world, version) {
        (World::Filter, Version::V0_1) => {
            Pre::Filter(FilterPre::new(instance_pre).map_err(mismatch)?)
        }
        (World::Transform, Version::V0_1) => {
            Pre::Transform(TransformPre::new(instance_pre).map_err(mismatch)?)
        }
        (World::Filter, Version::V0_2) => {
            Pre::Filter02(v0_2::filter::FilterPre::new(instance_pre).map_err(mismatch)?)
        }
        (World::Transform, Version::V0_2) => {
            Pre::Transform02(v0_2::transform::TransformPre::new(instance_pre).map_err(mismatch)?)
        }
    })
}

/// What one plugin made of one event.
#[derive(Debug)]
pub enum Decision {
    /// A filter kept the event as it was.
    Keep,
    /// A filter dropped it.
    Drop,
    /// A 0.1 transform replaced it with these outputs (none: dropped).
    Replace(Vec<wit::Output>),
    /// A 0.2 transform replaced it with these outputs, each the event it was given plus
    /// edits (none: dropped).
    Edit(Vec<v0_2::types::Output>),
}

/// A plugin's error as dead-letter headers and logs show it (the same for every version).
trait PluginErrorText {
    fn text(&self) -> String;
}

impl PluginErrorText for wit::PluginError {
    fn text(&self) -> String {
        match self {
            wit::PluginError::InvalidEvent(m) => format!("invalid-event: {m}"),
            wit::PluginError::InvalidConfig(m) => format!("invalid-config: {m}"),
            wit::PluginError::Failed(m) => format!("failed: {m}"),
        }
    }
}

impl PluginErrorText for v0_2::types::PluginError {
    fn text(&self) -> String {
        match self {
            v0_2::types::PluginError::InvalidEvent(m) => format!("invalid-event: {m}"),
            v0_2::types::PluginError::InvalidConfig(m) => format!("invalid-config: {m}"),
            v0_2::types::PluginError::Failed(m) => format!("failed: {m}"),
        }
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
    /// Bytes a transform chose to publish instead of the encoded change (contract 0.2's
    /// `output.payload`; the last one set in the chain).
    pub payload: Option<Payload>,
}

/// A message body a transform made itself (a protobuf, Avro or CSV record, say): the sink
/// publishes it as is, with its own `Content-Type`, instead of encoding the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload {
    /// The body.
    pub bytes: Vec<u8>,
    /// The message's `Content-Type` (checked by the chain: a plain header value).
    pub content_type: String,
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
