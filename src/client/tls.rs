//! TLS for relays reached over `https://` (and `wss://` for sessions): rustls
//! with the ring provider, trusting Mozilla's root store plus any private CA the
//! app adds (for a self-hosted relay with its own certificate authority).

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use super::error::ClientError;

/// Extra trust anchors added by the app; read when the config is first built.
static EXTRA_ROOTS: Mutex<Vec<CertificateDer<'static>>> = Mutex::new(Vec::new());
static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();

/// Trusts the CA certificates in the PEM file at `path`, in addition to the
/// public roots. Call before the first TLS connection (the CLI does this for
/// `KHUB_CA_FILE`).
pub fn trust_pem_file(path: &Path) -> Result<(), ClientError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            ClientError::config(
                format!("cannot read CA certificates from {}", path.display()),
                Some(std::sync::Arc::new(e)),
            )
        })?;
    if certs.is_empty() {
        return Err(ClientError::config(
            format!("{} holds no PEM certificate", path.display()),
            None,
        ));
    }
    if CONFIG.get().is_some() {
        return Err(ClientError::Invalid(
            "trust_pem_file must be called before the first TLS connection".into(),
        ));
    }
    EXTRA_ROOTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(certs);
    Ok(())
}

/// The client configuration, built once.
pub fn config() -> Result<Arc<ClientConfig>, ClientError> {
    if let Some(config) = CONFIG.get() {
        return Ok(Arc::clone(config));
    }
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in EXTRA_ROOTS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        roots.add(cert.clone()).map_err(|e| {
            ClientError::config(
                "an added CA certificate is not usable",
                Some(std::sync::Arc::new(e)),
            )
        })?;
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::config("TLS cannot be set up", Some(std::sync::Arc::new(e))))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::clone(CONFIG.get_or_init(|| Arc::new(config))))
}
