//! Plugins and the chain an event runs through.
//!
//! A [`Plugin`] is one component, checked at load time against the world it exports
//! (`filter` or `transform`), pre-instantiated once, and given its own store. A [`Chain`] runs
//! a pipeline's plugins in order over one event and says what to publish, or why the event
//! must be dead-lettered.

pub mod bindings;
pub mod convert;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, Store};

use self::bindings::filter::{Filter, FilterPre};
use self::bindings::transform::{Transform, TransformPre};
use self::bindings::wit;
use crate::config::{is_under_prefix, is_valid_subject, PipelineConfig, PluginLimits};
use crate::error::Error;
use crate::event::Change;
use crate::sandbox::{self, PluginState, Sandbox};

impl wit::Host for PluginState {}

impl bindings::filter::tidegate::plugin::log::Host for PluginState {
    fn write(&mut self, level: bindings::filter::tidegate::plugin::log::Level, message: String) {
        use bindings::filter::tidegate::plugin::log::Level;
        if !self.admit_log_line() {
            return;
        }
        let plugin = self.plugin.as_str();
        match level {
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl bindings::filter::tidegate::plugin::config::Host for PluginState {
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

/// One loaded plugin with its (lazily re-created) instance.
pub struct Plugin {
    name: String,
    path: PathBuf,
    world: World,
    config: BTreeMap<String, String>,
    limits: PluginLimits,
    engine: Engine,
    pre: Pre,
    live: Option<(Store<PluginState>, Instance)>,
    /// Fuel burnt by the last call, for the metrics.
    last_fuel: u64,
}

/// Why a plugin call produced no usable result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    /// The plugin's name.
    pub plugin: String,
    /// Short machine-friendly kind: `plugin-error`, `trap`, `out-of-fuel`, `deadline`,
    /// `memory` or `invalid-output`.
    pub kind: String,
    /// Human-readable detail.
    pub message: String,
}

impl Plugin {
    /// Loads, type-checks and initialises a plugin; any problem is an error naming the file.
    pub fn load(
        sandbox: &Sandbox,
        name: &str,
        path: &Path,
        config: &BTreeMap<String, String>,
        limits: PluginLimits,
    ) -> Result<Plugin, Error> {
        let fail = |message: String| Error::Plugin {
            name: name.to_string(),
            path: path.to_path_buf(),
            message,
        };
        let bytes =
            std::fs::read(path).map_err(|err| fail(format!("cannot read the file: {err}")))?;
        if bytes.get(0..4) != Some(b"\0asm") {
            return Err(fail("not a WebAssembly file (no \\0asm header)".into()));
        }
        let engine = sandbox.engine().clone();
        let component = Component::new(&engine, &bytes).map_err(|err| {
            fail(format!(
                "not a valid WebAssembly component (a core module must be wrapped with \
                 `wasm-tools component new`): {err:#}"
            ))
        })?;
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
        let instance_pre = linker.instantiate_pre(&component).map_err(|err| {
            fail(format!(
                "imports something tidegate does not grant (only tidegate:plugin/log and \
                 tidegate:plugin/config are offered): {err:#}"
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
            world,
            config: config.clone(),
            limits,
            engine,
            pre,
            live: None,
            last_fuel: 0,
        };
        plugin.live = Some(plugin.instantiate().map_err(|err| fail(err.message))?);
        Ok(plugin)
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

    fn error(&self, kind: &str, message: impl Into<String>) -> CallError {
        CallError {
            plugin: self.name.clone(),
            kind: kind.to_string(),
            message: message.into(),
        }
    }

    /// A fresh instance, `init` already called.
    fn instantiate(&self) -> Result<(Store<PluginState>, Instance), CallError> {
        let mut store = sandbox::new_store(&self.engine, &self.name, &self.config, &self.limits);
        sandbox::arm(&mut store, &self.limits).map_err(|m| self.error("trap", m))?;
        let instance = match &self.pre {
            Pre::Filter(pre) => pre.instantiate(&mut store).map(Instance::Filter),
            Pre::Transform(pre) => pre.instantiate(&mut store).map(Instance::Transform),
        };
        let instance = instance.map_err(|err| {
            self.error(
                "trap",
                format!("instantiation failed: {}", sandbox::trap_reason(&err)),
            )
        })?;
        let init = match &instance {
            Instance::Filter(f) => f.call_init(&mut store),
            Instance::Transform(t) => t.call_init(&mut store),
        };
        match init {
            Ok(Ok(())) => Ok((store, instance)),
            Ok(Err(err)) => Err(self.error("plugin-error", plugin_error_text(&err))),
            Err(err) => Err(self.error(
                "trap",
                format!("init trapped: {}", sandbox::trap_reason(&err)),
            )),
        }
    }

    /// Runs the plugin on one event. After a trap the instance is discarded (its memory may
    /// be half-updated) and the next call gets a fresh one.
    pub fn call(&mut self, event: &wit::ChangeEvent) -> Result<Decision, CallError> {
        let (mut store, instance) = match self.live.take() {
            Some(live) => live,
            None => self.instantiate()?,
        };
        sandbox::arm(&mut store, &self.limits).map_err(|m| self.error("trap", m))?;
        let result = match &instance {
            Instance::Filter(f) => f
                .call_filter(&mut store, event)
                .map(|r| r.map(|keep| if keep { Decision::Keep } else { Decision::Drop })),
            Instance::Transform(t) => t
                .call_transform(&mut store, event)
                .map(|r| r.map(Decision::Replace)),
        };
        self.last_fuel = sandbox::fuel_used(&store, &self.limits);
        let dropped = store.data_mut().take_dropped_log_lines();
        if dropped > 0 {
            tracing::warn!(plugin = %self.name, dropped, "plugin log lines over the per-call cap were dropped");
        }
        match result {
            Ok(Ok(decision)) => {
                self.live = Some((store, instance));
                Ok(decision)
            }
            Ok(Err(err)) => {
                self.live = Some((store, instance));
                Err(self.error("plugin-error", plugin_error_text(&err)))
            }
            Err(err) => {
                let reason = sandbox::trap_reason(&err);
                let kind = reason.split(':').next().unwrap_or("trap").to_string();
                Err(self.error(&kind, reason))
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

/// What the chain decided for one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Publish these, in order (none: the event was filtered out).
    Publish(Vec<Output>),
    /// A plugin failed: publish the original event to the dead-letter subject.
    DeadLetter(CallError),
}

/// A pipeline's plugins, in order.
pub struct Chain {
    plugins: Vec<Plugin>,
    /// One series per plugin, in chain order.
    metrics: Vec<std::sync::Arc<crate::metrics::PluginMetrics>>,
    subject_prefix: String,
}

impl Chain {
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
                Plugin::load(sandbox, &p.name, &path, &p.config, p.limits)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let labels = crate::metrics::Labels::pipeline(&pipeline.id);
        Ok(Chain {
            metrics: plugins
                .iter()
                .map(|p| crate::metrics::plugin(&labels, p.name()))
                .collect(),
            plugins,
            subject_prefix: pipeline.sink.subject_prefix.clone(),
        })
    }

    /// The loaded plugins.
    pub fn plugins(&self) -> &[Plugin] {
        &self.plugins
    }

    /// Runs the chain over one change.
    pub fn run(&mut self, change: &Change) -> Verdict {
        // The contract's form of the original, converted only if some plugin needs it.
        let mut sent: Option<wit::ChangeEvent> = None;
        // What flows down the chain; `None` is the original event, untouched so far.
        let mut current: Vec<Option<wit::Output>> = vec![None];
        for (plugin, metrics) in self.plugins.iter_mut().zip(&self.metrics) {
            let mut next = Vec::with_capacity(current.len());
            for item in current {
                let input = match &item {
                    Some(output) => &output.event,
                    None => &*sent.get_or_insert_with(|| convert::to_wit(change)),
                };
                let started = std::time::Instant::now();
                let called = plugin.call(input);
                metrics.call(started.elapsed(), plugin.last_fuel, called.is_err());
                let outputs = match called {
                    Ok(Decision::Keep) => {
                        next.push(item);
                        continue;
                    }
                    Ok(Decision::Drop) => continue,
                    Ok(Decision::Replace(outputs)) => outputs,
                    Err(err) => return Verdict::DeadLetter(err),
                };
                for mut out in outputs {
                    if let Err(message) = check_output(&out, input, &self.subject_prefix) {
                        return Verdict::DeadLetter(plugin.error("invalid-output", message));
                    }
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
                        .map(|p| p.name.clone())
                        .unwrap_or_default();
                    return Verdict::DeadLetter(CallError {
                        plugin: last,
                        kind: "invalid-output".into(),
                        message,
                    });
                }
            }
        }
        Verdict::Publish(outputs)
    }
}

/// What a transform may not do to an output: change the event id, leave the pipeline's
/// subjects, or set reserved or malformed headers.
fn check_output(out: &wit::Output, input: &wit::ChangeEvent, prefix: &str) -> Result<(), String> {
    if out.event.id != input.id {
        return Err(format!(
            "output changed the event id from '{}' to '{}'; ids are how duplicates are dropped",
            input.id, out.event.id
        ));
    }
    if let Some(subject) = &out.subject {
        if !is_valid_subject(subject, false) || !is_under_prefix(subject, prefix) {
            return Err(format!(
                "output subject '{subject}' is not a valid subject under '{prefix}.'"
            ));
        }
    }
    for header in &out.headers {
        let lower = header.name.to_ascii_lowercase();
        if lower.starts_with("nats-") || lower.starts_with("tidegate-") {
            return Err(format!("header '{}' is reserved", header.name));
        }
        let valid_name = !header.name.is_empty()
            && header
                .name
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b':');
        if !valid_name || header.value.contains(['\r', '\n']) {
            return Err(format!(
                "header '{}' has an invalid name or value",
                header.name
            ));
        }
    }
    Ok(())
}
