//! What tidegate carries from source to sink: the change event, its resume token, the
//! position a pipeline has durably published, and the subjects it publishes to. Every other
//! component depends on this one; it depends on none of them.

pub mod change;
pub mod ejson;
pub mod failure;
pub mod key;
pub mod position;
pub mod subject;
pub mod token;

pub use change::{Change, Fields, Namespace, Operation, SourceEvent};
pub use position::{IncrementalProgress, InitialProgress, Position, SnapshotProgress};
