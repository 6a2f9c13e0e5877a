//! What the admin API lets in at once. Every connection is a task and a socket, and every
//! upload is a body of up to `admin.max_upload_mib` held in memory and then compiled: without
//! bounds, a flood of connections (from anyone) or of uploads (from one tenant's token) would
//! take the memory, sockets and CPU that every tenant's events need.
//!
//! - At most [`MAX_CONNECTIONS`] connections are served at once; past it a connection is
//!   answered `503` and closed at once.
//! - At most [`MAX_UPLOADS`] uploads are read and checked at once, and one per tenant: a
//!   second upload for a tenant while its first is read or checked is refused (`429`); other
//!   uploads wait their turn before their bodies are read, up to [`UPLOAD_WAIT`] (then
//!   `503`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};

use super::http::Response;

/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Most uploads read and checked at once (each compiles its component: seconds of CPU and
/// hundreds of MiB for a large one).
pub const MAX_UPLOADS: usize = 2;

/// How long an upload waits for its turn before it is refused as busy.
pub const UPLOAD_WAIT: Duration = Duration::from_secs(120);

/// The API's bounds (see the module docs).
pub struct Gate {
    connections: Arc<Semaphore>,
    uploads: Semaphore,
    /// Tenants with an upload being read or checked.
    uploading: Mutex<HashSet<String>>,
}

/// A tenant's turn to upload: its body may be read and checked while this lives.
pub struct Upload<'a> {
    _claim: Claim<'a>,
    _permit: SemaphorePermit<'a>,
}

/// A tenant's one upload at a time; given back when dropped (answered, or the wait cancelled).
struct Claim<'a> {
    gate: &'a Gate,
    tenant: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.gate.uploading().remove(&self.tenant);
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate {
            connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            uploads: Semaphore::new(MAX_UPLOADS),
            uploading: Mutex::new(HashSet::new()),
        }
    }
}

impl Gate {
    /// A place for one more connection, if there is one.
    pub fn connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// Tenant `tenant`'s turn to upload: refused if it has an upload under way already,
    /// waited for while [`MAX_UPLOADS`] others are.
    pub async fn upload(&self, tenant: &str) -> Result<Upload<'_>, Response> {
        if !self.uploading().insert(tenant.to_string()) {
            return Err(Response::error(
                429,
                format!(
                    "tenant '{tenant}' has an upload being checked already; send the next one \
                     when it is answered"
                ),
            ));
        }
        let claim = Claim {
            gate: self,
            tenant: tenant.to_string(),
        };
        match tokio::time::timeout(UPLOAD_WAIT, self.uploads.acquire()).await {
            Ok(Ok(permit)) => Ok(Upload {
                _claim: claim,
                _permit: permit,
            }),
            _ => Err(Response::error(
                503,
                format!(
                    "{MAX_UPLOADS} uploads have been checked for {}s and none finished; retry \
                     later",
                    UPLOAD_WAIT.as_secs()
                ),
            )),
        }
    }

    fn uploading(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.uploading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tenant has one upload at a time, given back when it ends; other tenants' uploads
    /// go on beside it, up to the bound, past which they wait.
    #[tokio::test]
    async fn one_upload_per_tenant_and_a_few_in_all() {
        let gate = Gate::default();
        let acme = gate.upload("shop.acme").await.expect("acme's turn");
        let again = gate
            .upload("shop.acme")
            .await
            .err()
            .expect("a second upload");
        assert_eq!(again.status, 429);
        let globex = gate.upload("shop.globex").await.expect("globex's turn");
        // Both places taken: a third tenant waits until one is given back.
        let initech = gate.upload("shop.initech");
        tokio::pin!(initech);
        assert!(futures::poll!(initech.as_mut()).is_pending());
        drop(globex);
        let initech = initech.await.expect("initech's turn after globex's");
        drop(acme);
        drop(gate.upload("shop.acme").await.expect("acme's next upload"));
        drop(initech);
    }

    /// Connections past the bound find no place until one is given back.
    #[test]
    fn connections_are_bounded() {
        let gate = Gate::default();
        let held: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| gate.connection().expect("a place"))
            .collect();
        assert!(gate.connection().is_none());
        drop(held);
        assert!(gate.connection().is_some());
    }
}
