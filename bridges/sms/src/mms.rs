//! MMS media: the name an inbound attachment gets in Matrix (gateways give none). Downloading
//! it is the framework's [`trestle::fetch`].

/// A file name for the `n`-th item (from 1) of message `id`, with an extension for common types:
/// `MMS SMab12 1.png`.
pub fn filename(id: &str, n: usize, mimetype: &str) -> String {
    let id: String = id.chars().filter(char::is_ascii_alphanumeric).take(40).collect();
    match trestle::fetch::extension_for(mimetype) {
        Some(ext) => format!("MMS {id} {n}.{ext}"),
        None => format!("MMS {id} {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(filename("SM/1a", 2, "image/png"), "MMS SM1a 2.png");
        assert_eq!(filename("x", 1, "image/jpg"), "MMS x 1.jpg");
        assert_eq!(filename("x", 1, "application/x-unknown"), "MMS x 1");
    }
}
