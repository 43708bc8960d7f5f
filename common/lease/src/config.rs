//! Where the lease lives and how long it lasts: etcd's endpoints, the guest's key, the
//! holder's name, the TTL and the fencing margin, and TLS with client certificates.

use std::path::PathBuf;
use std::time::Duration;

/// Errors in a lease configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No endpoint given.
    #[error("no etcd endpoint given")]
    NoEndpoint,
    /// An endpoint that is not a URL etcd's client takes.
    #[error("etcd endpoint {0:?} is not http(s)://host:port")]
    Endpoint(String),
    /// An empty key.
    #[error("the lease key is empty")]
    NoKey,
    /// A TTL etcd cannot grant.
    #[error("lease TTL {0:?} must be whole seconds, at least 2 s")]
    Ttl(Duration),
    /// A margin that leaves no time to hold the lease.
    #[error("fencing margin {margin:?} must be less than half the TTL {ttl:?}")]
    Margin {
        /// The margin.
        margin: Duration,
        /// The TTL.
        ttl: Duration,
    },
    /// TLS files given for a plain-http endpoint, or https without them.
    #[error(
        "etcd endpoint {0:?} and the TLS files disagree (https needs --etcd-ca/--etcd-cert/--etcd-key, http takes none)"
    )]
    TlsScheme(String),
}

/// The client's TLS files (etcd's own PEM files: the CA that signed the members'
/// certificates, and this client's certificate and key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// This client's certificate.
    pub cert: PathBuf,
    /// This client's private key.
    pub key: PathBuf,
}

/// One guest's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// etcd's client URLs (`http://host:port` or `https://…`); any member will do.
    pub endpoints: Vec<String>,
    /// The guest's key, e.g. `/castor/guests/web1`.
    pub key: String,
    /// Who holds it (stored as the key's value, shown to whoever finds it taken).
    pub holder: String,
    /// The lease's time to live (whole seconds, at least 2).
    pub ttl: Duration,
    /// How long before the lease could expire in etcd the holder stops trusting it: time
    /// to stop the guest and hold its output, plus clock-rate slack.
    pub margin: Duration,
    /// TLS with client certificates, for `https` endpoints.
    pub tls: Option<TlsFiles>,
}

impl LeaseConfig {
    /// A plain-http configuration with the default TTL (5 s) and margin (1 s).
    pub fn new(endpoints: Vec<String>, key: &str, holder: &str) -> Self {
        Self {
            endpoints,
            key: key.to_owned(),
            holder: holder.to_owned(),
            ttl: Duration::from_secs(5),
            margin: Duration::from_secs(1),
            tls: None,
        }
    }

    /// Check the configuration before anything connects.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoint);
        }
        for e in &self.endpoints {
            let rest = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .ok_or_else(|| ConfigError::Endpoint(e.clone()))?;
            let port_ok = rest
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok {
                return Err(ConfigError::Endpoint(e.clone()));
            }
            if e.starts_with("https://") != self.tls.is_some() {
                return Err(ConfigError::TlsScheme(e.clone()));
            }
        }
        if self.key.is_empty() {
            return Err(ConfigError::NoKey);
        }
        if self.ttl.subsec_nanos() != 0 || self.ttl < Duration::from_secs(2) {
            return Err(ConfigError::Ttl(self.ttl));
        }
        if self.margin * 2 >= self.ttl {
            return Err(ConfigError::Margin {
                margin: self.margin,
                ttl: self.ttl,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configurations_are_named() {
        let ok = LeaseConfig::new(vec!["http://127.0.0.1:2379".into()], "/k", "me");
        ok.validate().unwrap();
        let with = |f: &dyn Fn(&mut LeaseConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(with(&|c| c.endpoints.clear()).contains("no etcd endpoint"));
        assert!(with(&|c| c.endpoints = vec!["127.0.0.1:2379".into()]).contains("127.0.0.1:2379"));
        assert!(with(&|c| c.endpoints = vec!["http://host".into()]).contains("http://host"));
        assert!(with(&|c| c.key.clear()).contains("key is empty"));
        assert!(with(&|c| c.ttl = Duration::from_millis(2500)).contains("whole seconds"));
        assert!(with(&|c| c.ttl = Duration::from_secs(1)).contains("at least 2"));
        assert!(with(&|c| c.margin = Duration::from_secs(3)).contains("half the TTL"));
        assert!(with(&|c| c.endpoints = vec!["https://h:1".into()]).contains("TLS files"));
    }
}
