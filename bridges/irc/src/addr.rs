//! Stable per-user source addresses inside an IPv6 prefix.

use std::net::Ipv6Addr;

use sha2::{Digest, Sha256};

/// Parses `2001:db8::/64` into the network address and prefix length (1–120).
pub fn parse_prefix(s: &str) -> Option<(Ipv6Addr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let addr: Ipv6Addr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    if !(1..=120).contains(&len) {
        return None;
    }
    let mask = u128::MAX << (128 - u32::from(len));
    Some((Ipv6Addr::from(u128::from(addr) & mask), len))
}

/// The address of `user_id` inside the prefix: the host bits are a hash of the user id, so a
/// user always connects from the same address and the network can ban them alone.
pub fn address_for(prefix: (Ipv6Addr, u8), user_id: &str) -> Ipv6Addr {
    let (net, len) = prefix;
    let digest = Sha256::digest(user_id.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    let host_mask = u128::MAX >> u32::from(len);
    let mut host = u128::from_be_bytes(bytes) & host_mask;
    if host == 0 {
        host = 1;
    }
    Ipv6Addr::from(u128::from(net) | host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_distinct_and_inside_the_prefix() {
        let p = parse_prefix("2001:db8:1:2:ffff::/64").unwrap();
        assert_eq!(p.0, "2001:db8:1:2::".parse::<Ipv6Addr>().unwrap());
        let a = address_for(p, "@alice:example.org");
        let b = address_for(p, "@bob:example.org");
        assert_eq!(a, address_for(p, "@alice:example.org"));
        assert_ne!(a, b);
        assert_eq!(u128::from(a) >> 64, u128::from(p.0) >> 64);
        assert!(parse_prefix("2001:db8::/0").is_none());
        assert!(parse_prefix("2001:db8::/121").is_none());
        assert!(parse_prefix("10.0.0.0/8").is_none());
        assert!(parse_prefix("nonsense").is_none());
    }
}
