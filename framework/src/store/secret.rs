//! Secrets at rest: XChaCha20-Poly1305 with a key from config.

use chacha20poly1305::{
    XChaCha20Poly1305, XNonce,
    aead::{Aead, KeyInit},
};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// An error while sealing or opening a secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// No key is configured.
    #[error(
        "no secret key is configured (set `database.secret_key` or TRESTLE__DATABASE__SECRET_KEY)"
    )]
    NoKey,
    /// The ciphertext is damaged, or was sealed with another key.
    #[error("the stored secret cannot be decrypted (wrong key or damaged data)")]
    Decrypt,
    /// The decrypted data is not UTF-8.
    #[error("the stored secret is not text")]
    NotText,
}

/// Seals and opens secrets with a key derived from the configured passphrase.
///
/// Layout of a sealed value: a version byte (1), a 24-byte random nonce, the ciphertext.
#[derive(Clone)]
pub struct SecretBox {
    cipher: Option<XChaCha20Poly1305>,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox").field("configured", &self.cipher.is_some()).finish()
    }
}

impl SecretBox {
    /// A box keyed by SHA-256 of `passphrase`; `None` gives a box that refuses to seal.
    pub fn new(passphrase: Option<&str>) -> Self {
        let cipher = passphrase.map(|p| {
            let key = Sha256::digest(p.as_bytes());
            XChaCha20Poly1305::new(&key)
        });
        Self { cipher }
    }

    /// Encrypts `plaintext`.
    pub fn seal(&self, plaintext: &str) -> Result<Vec<u8>, SecretError> {
        let cipher = self.cipher.as_ref().ok_or(SecretError::NoKey)?;
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ct = cipher
            .encrypt(XNonce::from_slice(&nonce), plaintext.as_bytes())
            .map_err(|_| SecretError::Decrypt)?;
        let mut out = Vec::with_capacity(1 + 24 + ct.len());
        out.push(1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a value made by [`seal`](Self::seal).
    pub fn open(&self, sealed: &[u8]) -> Result<String, SecretError> {
        let cipher = self.cipher.as_ref().ok_or(SecretError::NoKey)?;
        if sealed.len() < 25 || sealed[0] != 1 {
            return Err(SecretError::Decrypt);
        }
        let pt = cipher
            .decrypt(XNonce::from_slice(&sealed[1..25]), &sealed[25..])
            .map_err(|_| SecretError::Decrypt)?;
        String::from_utf8(pt).map_err(|_| SecretError::NotText)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_wrong_key() {
        let b = SecretBox::new(Some("correct horse"));
        let sealed = b.seal("hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(b.open(&sealed).unwrap(), "hunter2");
        let other = SecretBox::new(Some("battery staple"));
        assert!(matches!(other.open(&sealed), Err(SecretError::Decrypt)));
        assert!(matches!(b.open(&sealed[..10]), Err(SecretError::Decrypt)));
        assert!(matches!(SecretBox::new(None).seal("x"), Err(SecretError::NoKey)));
        // Two seals of the same text differ (random nonce).
        assert_ne!(b.seal("a").unwrap(), b.seal("a").unwrap());
    }
}
