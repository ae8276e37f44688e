//! O(1) demultiplexing of a shard's UDP socket onto its connections.
//!
//! A connection is found by the local ICE ufrag of the first STUN packet (the
//! `USERNAME` attribute is `<our ufrag>:<their ufrag>`), which also teaches us the
//! client's address; every later DTLS/SRTP/RTCP packet is found by that address. No
//! packet is ever offered to connections one by one.

use std::hash::Hash;
use std::net::SocketAddr;

use hashbrown::HashMap;
use str0m::ice::StunMessage;

/// Addresses one connection may be reached from (ICE may probe several candidates);
/// past this the oldest is forgotten, so a client that keeps moving is still found.
const MAX_ADDRS_PER_CONN: usize = 8;

pub struct Router<K> {
    by_ufrag: HashMap<String, K>,
    by_addr: HashMap<SocketAddr, K>,
    addrs_of: HashMap<K, Vec<SocketAddr>>,
}

impl<K: Copy + Eq + Hash> Default for Router<K> {
    fn default() -> Self {
        Self {
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            addrs_of: HashMap::new(),
        }
    }
}

impl<K: Copy + Eq + Hash> Router<K> {
    pub fn insert(&mut self, ufrag: String, key: K) {
        self.by_ufrag.insert(ufrag, key);
        self.addrs_of.insert(key, Vec::new());
    }

    /// An ICE restart gave the connection a new local ufrag; its addresses stay.
    pub fn rename(&mut self, old: &str, new: String) {
        if let Some(key) = self.by_ufrag.remove(old) {
            self.by_ufrag.insert(new, key);
        }
    }

    pub fn remove(&mut self, ufrag: &str, key: K) {
        self.by_ufrag.remove(ufrag);
        for addr in self.addrs_of.remove(&key).unwrap_or_default() {
            if self.by_addr.get(&addr) == Some(&key) {
                self.by_addr.remove(&addr);
            }
        }
    }

    /// The connection a datagram from `source` belongs to.
    pub fn route(&mut self, source: SocketAddr, datagram: &[u8]) -> Option<K> {
        // RFC 7983: STUN's first byte is 0..=3. STUN is routed by ufrag even from a
        // known address, so an ICE restart or a second candidate finds its way.
        if datagram.first().is_some_and(|b| *b < 4)
            && let Some(key) = self.route_stun(source, datagram)
        {
            return Some(key);
        }
        self.by_addr.get(&source).copied()
    }

    fn route_stun(&mut self, source: SocketAddr, datagram: &[u8]) -> Option<K> {
        let stun = StunMessage::parse(datagram).ok()?;
        let (local_ufrag, _) = stun.split_username()?;
        let key = *self.by_ufrag.get(local_ufrag)?;
        let addrs = self.addrs_of.get_mut(&key)?;
        if !addrs.contains(&source) {
            if addrs.len() == MAX_ADDRS_PER_CONN {
                let oldest = addrs.remove(0);
                if self.by_addr.get(&oldest) == Some(&key) {
                    self.by_addr.remove(&oldest);
                }
            }
            addrs.push(source);
            self.by_addr.insert(source, key);
        }
        Some(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use str0m::ice::{StunMessage, TransId};

    fn binding_request(username: &str) -> Vec<u8> {
        let msg = StunMessage::binding_request(username, TransId::new(), true, 0, 1, false);
        let mut buf = vec![0_u8; 512];
        let n = msg
            .to_bytes(Some(b"password"), &mut buf, |_, _| [0; 20])
            .expect("serialize");
        buf.truncate(n);
        buf
    }

    #[test]
    fn stun_teaches_the_address_then_media_follows_it() {
        let mut router = Router::default();
        router.insert("srv1".into(), 1_u32);
        router.insert("srv2".into(), 2_u32);
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let srtp = [0x80_u8, 0x60, 0, 1];

        assert_eq!(router.route(a, &srtp), None, "unknown address");
        assert_eq!(router.route(a, &binding_request("srv2:cli")), Some(2));
        assert_eq!(router.route(b, &binding_request("srv1:cli")), Some(1));
        assert_eq!(router.route(a, &srtp), Some(2));
        assert_eq!(router.route(b, &srtp), Some(1));
        assert_eq!(router.route(a, &binding_request("nobody:cli")), Some(2));

        router.remove("srv2", 2);
        assert_eq!(
            router.route(a, &srtp),
            None,
            "forgotten with its connection"
        );
        assert_eq!(router.route(b, &srtp), Some(1));
    }

    #[test]
    fn a_restarted_connection_is_found_by_its_new_ufrag_from_anywhere() {
        let mut router = Router::default();
        router.insert("old".into(), 1_u32);
        let srtp = [0x80_u8, 0x60, 0, 1];
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(
            router.route(addr(4000), &binding_request("old:cli")),
            Some(1)
        );

        router.rename("old", "new".into());
        assert_eq!(
            router.route(addr(4000), &srtp),
            Some(1),
            "the address stays"
        );
        assert_eq!(router.route(addr(5000), &binding_request("old:cli")), None);
        for port in 5001..=5010 {
            assert_eq!(
                router.route(addr(port), &binding_request("new:cli")),
                Some(1)
            );
        }
        assert_eq!(
            router.route(addr(5010), &srtp),
            Some(1),
            "the newest is known"
        );
        assert_eq!(
            router.route(addr(4000), &srtp),
            None,
            "the oldest is forgotten"
        );
    }
}
