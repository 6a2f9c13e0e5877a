//! High availability: instances sharing pipelines through NATS KV leases, and the fence that
//! stops a former owner writing the moment its lease may have passed to another.

pub mod fence;
pub mod lease;
pub mod shared;
