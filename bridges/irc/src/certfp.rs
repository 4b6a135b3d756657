//! Per-user TLS client certificates for puppets (CertFP): `!certfp` generates a self-signed
//! certificate and its private key for a user on a network. The bridge keeps them sealed in
//! the store like `!storepass` secrets; the user adds the certificate's fingerprint to their
//! services account (`/msg NickServ CERT ADD <fingerprint>`), and from their next connection
//! their puppet presents the certificate in the TLS handshake and logs in by SASL EXTERNAL.

use base64::Engine as _;
use trestle::store::{SecretBox, SecretError};

use crate::conn::ClientCert;

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Key or certificate generation failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The stored PEM text is not a certificate and a key.
    #[error("not a usable certificate: {0}")]
    Invalid(String),
    /// Sealing or opening failed (no secret key, or another key than the one that sealed).
    #[error("{0}")]
    Secret(#[from] SecretError),
}

/// A user's certificate and private key, as PEM text (the certificate, then the key), and the
/// certificate's fingerprint. The key is a secret: `Debug` shows the fingerprint only.
pub struct UserCert {
    pem: String,
    fingerprint: String,
}

impl std::fmt::Debug for UserCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCert")
            .field("fingerprint", &self.fingerprint)
            .field("pem", &"<redacted>")
            .finish()
    }
}

/// The certificate's common name for `user_id`: its printable ASCII, at most 64 characters
/// (the X.509 limit). Nothing checks it; it only tells a human whose certificate this is.
fn common_name(user_id: &str) -> String {
    let cn: String = user_id.chars().filter(char::is_ascii_graphic).take(64).collect();
    if cn.is_empty() { "trestle-user".to_owned() } else { cn }
}

impl UserCert {
    /// A new self-signed certificate for `user_id`: a fresh ECDSA P-256 key (from `ring`), the
    /// user id as the common name, and rcgen's long validity (1975 to 4096), as servers and
    /// services only compare fingerprints and never check expiry or issuer.
    pub fn generate(user_id: &str) -> Result<Self, CertError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name(user_id));
        let cert = params.self_signed(&key)?;
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        Ok(Self { fingerprint: crate::conn::fingerprint(cert.der()), pem })
    }

    /// Reads back the PEM text of [`Self::pem`] (opened from the store).
    pub fn from_pem(pem: String) -> Result<Self, CertError> {
        let fingerprint = ClientCert::from_pem(&pem).map_err(CertError::Invalid)?.fingerprint();
        Ok(Self { pem, fingerprint })
    }

    /// The certificate and the private key, as PEM text: the secret to seal.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The PEM text sealed with the bridge's key (as `!storepass` secrets are), in base64 for a
    /// JSON settings value.
    pub fn seal(&self, secrets: &SecretBox) -> Result<String, CertError> {
        Ok(base64::engine::general_purpose::STANDARD.encode(secrets.seal(&self.pem)?))
    }

    /// Opens what [`Self::seal`] made.
    pub fn open(sealed: &str, secrets: &SecretBox) -> Result<Self, CertError> {
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|e| CertError::Invalid(e.to_string()))?;
        Self::from_pem(secrets.open(&sealed)?)
    }

    /// The certificate's fingerprint (see [`ClientCert::fingerprint`]).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The certificate and key for a connection's TLS handshake.
    pub fn client_cert(&self) -> Result<ClientCert, CertError> {
        ClientCert::from_pem(&self.pem).map_err(CertError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificates_read_back_with_their_fingerprint() {
        let c = UserCert::generate("@alice:example.org").unwrap();
        let fp = c.fingerprint().to_owned();
        assert_eq!(fp.len(), 64);
        assert!(fp.chars().all(|ch| ch.is_ascii_digit() || ('a'..='f').contains(&ch)), "{fp}");
        assert!(c.pem().starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(c.pem().contains("-----BEGIN PRIVATE KEY-----"));
        let back = UserCert::from_pem(c.pem().to_owned()).unwrap();
        assert_eq!(back.fingerprint(), fp);
        assert_eq!(back.client_cert().unwrap().fingerprint(), fp);
        // Each call makes a new key, hence a new certificate.
        assert_ne!(UserCert::generate("@alice:example.org").unwrap().fingerprint(), fp);
    }

    #[test]
    fn sealed_at_rest_and_opened_with_the_same_key_only() {
        let c = UserCert::generate("@erin:example.org").unwrap();
        let key = SecretBox::new(Some("test-only-secret-key-0123456789"));
        let sealed = c.seal(&key).unwrap();
        let raw = base64::engine::general_purpose::STANDARD.decode(&sealed).unwrap();
        assert!(!sealed.contains("BEGIN") && !raw.windows(5).any(|w| w == b"BEGIN"));
        let opened = UserCert::open(&sealed, &key).unwrap();
        assert_eq!(opened.fingerprint(), c.fingerprint());
        assert_eq!(opened.pem(), c.pem());
        // Each seal has its own nonce.
        assert_ne!(c.seal(&key).unwrap(), sealed);
        let other = SecretBox::new(Some("another-key-entirely-0123456789"));
        assert!(matches!(UserCert::open(&sealed, &other), Err(CertError::Secret(_))));
        assert!(UserCert::open("%%not base64", &key).is_err());
        assert!(matches!(c.seal(&SecretBox::new(None)), Err(CertError::Secret(_))));
    }

    #[test]
    fn the_fingerprint_is_the_sha256_of_the_der_certificate() {
        use base64::Engine as _;
        let c = UserCert::generate("@bob:example.org").unwrap();
        let b64: String =
            c.pem().lines().skip(1).take_while(|l| !l.starts_with("-----END")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(c.fingerprint(), crate::conn::fingerprint(&der));
        // A known vector: SHA-256 of the empty input.
        assert_eq!(
            crate::conn::fingerprint(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let c = UserCert::generate("@carol:example.org").unwrap();
        let shown = format!("{c:?} {:?}", c.client_cert().unwrap());
        assert!(!shown.contains("PRIVATE KEY") && !shown.contains("MIG"), "{shown}");
        assert!(shown.contains(c.fingerprint()));
    }

    #[test]
    fn hostile_or_broken_pem_is_refused() {
        assert!(UserCert::from_pem(String::new()).is_err());
        assert!(UserCert::from_pem("not pem\r\n\0".to_owned()).is_err());
        let c = UserCert::generate("@dave:example.org").unwrap();
        let cert_only: String = c.pem().split("-----BEGIN PRIVATE KEY").next().unwrap().to_owned();
        assert!(UserCert::from_pem(cert_only).is_err());
    }

    #[test]
    fn common_names_are_printable_and_bounded() {
        assert_eq!(common_name("@alice:example.org"), "@alice:example.org");
        assert_eq!(common_name("@a\r\nb\0 c:x"), "@abc:x");
        assert_eq!(common_name(&"x".repeat(300)).len(), 64);
        assert_eq!(common_name("\n"), "trestle-user");
        assert!(UserCert::generate("@é\u{202e}:x").is_ok());
    }
}
