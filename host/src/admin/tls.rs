//! TLS for the admin API: the listener's certificate (`[admin.tls]`) and the trust the CLI
//! (`tidegate tenant …`) puts in it.
//!
//! Tokens travel in every request, so an API reachable beyond the host it runs on should
//! speak TLS; without `[admin.tls]` the listener is plain HTTP and tidegate warns when it is
//! bound to anything but a loopback address. Both sides use rustls with the ring provider,
//! the one the NATS and MongoDB clients already bring.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::admin::AdminTls;

/// The acceptor for `[admin.tls]`, or an error naming the file and what is wrong with it.
pub fn acceptor(tls: &AdminTls) -> Result<tokio_rustls::TlsAcceptor, String> {
    let chain = certificates(&tls.cert_file, "admin.tls.cert_file")?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|err| {
        format!(
            "admin.tls.key_file: no private key read from {}: {err}",
            tls.key_file.display()
        )
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("admin.tls: {err}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|err| {
            format!(
                "admin.tls: the key in {} does not go with the certificate in {}: {err}",
                tls.key_file.display(),
                tls.cert_file.display()
            )
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The CLI's TLS settings: trusting the certificates in `ca_file` when given (a private
/// CA, or the server's self-signed certificate), else the system's roots.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            for certificate in certificates(file, "the CA file")? {
                roots
                    .add(certificate)
                    .map_err(|err| format!("{}: not a usable CA: {err}", file.display()))?;
            }
        }
        None => {
            let system = rustls_native_certs::load_native_certs()
                .map_err(|err| format!("cannot read the system's CA certificates: {err}"))?;
            // Certificates the system has but rustls cannot parse are skipped, as browsers do.
            let (_added, _skipped) = roots.add_parsable_certificates(system);
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file; an error when there is none.
fn certificates(file: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let read = CertificateDer::pem_file_iter(file)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>());
    match read {
        Ok(chain) if !chain.is_empty() => Ok(chain),
        Ok(_) => Err(format!(
            "{what}: {} holds no PEM certificate",
            file.display()
        )),
        Err(err) => Err(format!("{what}: cannot read {}: {err}", file.display())),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_empty_certificate_files_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = AdminTls {
            cert_file: dir.path().join("absent.pem"),
            key_file: dir.path().join("absent.key"),
        };
        let Err(err) = acceptor(&missing) else {
            panic!("a missing certificate file was accepted")
        };
        assert!(
            err.contains("admin.tls.cert_file") && err.contains("absent.pem"),
            "{err}"
        );

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").expect("write");
        let err = client_config(Some(&garbage)).expect_err("refused");
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }
}
