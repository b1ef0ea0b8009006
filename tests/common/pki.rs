//! A test certificate authority, with a server certificate for
//! 127.0.0.1/localhost and a client certificate, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// PEM files of a test CA and the certificates it signed.
pub struct TestPki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// A folder holding only `ca.crt`, as skopeo's `--cert-dir` wants it.
    pub ca_dir: PathBuf,
    /// The server certificate (127.0.0.1, localhost).
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

fn leaf(
    name: &str,
    alt_names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'_, KeyPair>,
) -> (String, String) {
    let mut params = CertificateParams::new(alt_names.iter().map(|name| name.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let certificate = params.signed_by(&key, issuer).unwrap();
    (certificate.pem(), key.serialize_pem())
}

impl TestPki {
    /// Makes the CA and certificates under `directory`.
    pub fn create(directory: &Path) -> TestPki {
        std::fs::create_dir_all(directory.join("ca-dir")).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "dvcr test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let (server_cert, server_key) = leaf(
            "dvcr",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
        );
        let (client_cert, client_key) = leaf("a client", &[], ExtendedKeyUsagePurpose::ClientAuth, &ca);
        let write = |name: &str, text: &str| {
            let path = directory.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let pki = TestPki {
            ca: write("ca.pem", &ca.pem()),
            ca_dir: directory.join("ca-dir"),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server-key.pem", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client-key.pem", &client_key),
        };
        std::fs::write(pki.ca_dir.join("ca.crt"), ca.pem()).unwrap();
        pki
    }
}
