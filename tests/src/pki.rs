//! Certificates for the tests of etcd over TLS, made with rcgen (no openssl
//! binary): a CA, etcd's server certificate for its address, a client
//! certificate for overlayd, and a second CA that signed none of them.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};

/// PEM files in a directory.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA that signed etcd's and the client's certificates.
    pub ca: PathBuf,
    /// etcd's certificate, for `server_ip` only, and its key.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// overlayd's client certificate and key.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing of this.
    pub other_ca: PathBuf,
}

fn ca(name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

impl Pki {
    /// Makes the files in `dir`, etcd's certificate naming `server_ip` alone.
    pub fn make(dir: &Path, server_ip: IpAddr) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let authority = ca("overlay test etcd CA")?;
        let write = |name: &str, pem: String| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, pem)?;
            Ok(path)
        };
        let mut server = CertificateParams::new(vec![server_ip.to_string()])?;
        server.distinguished_name.push(DnType::CommonName, "etcd");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server.signed_by(&server_key, &authority)?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name.push(DnType::CommonName, "overlayd");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate()?;
        let client_cert = client.signed_by(&client_key, &authority)?;
        Ok(Pki {
            ca: write("ca.pem", authority.pem())?,
            server_cert: write("etcd.pem", server_cert.pem())?,
            server_key: write("etcd-key.pem", server_key.serialize_pem())?,
            client_cert: write("client.pem", client_cert.pem())?,
            client_key: write("client-key.pem", client_key.serialize_pem())?,
            other_ca: write("other-ca.pem", ca("a CA etcd never heard of")?.pem())?,
        })
    }
}
