//! Address management: a tenant's subnet is split into per-node blocks, and
//! each node hands out addresses from its block.
//!
//! In a block, the first host address is the gateway (the node's bridge) and
//! the rest go to endpoints. Allocation is next-fit: a released address is
//! handed out again only after the others, so a peer's stale ARP entry for a
//! just-destroyed endpoint does not point at its successor.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("{input:?} is not an IPv4 CIDR: {reason}")]
    Unparsable { input: String, reason: String },
    #[error("{given} has host bits set; the network is {network}")]
    HostBitsSet {
        given: Ipv4Network,
        network: Ipv4Network,
    },
    #[error("block size /{block} does not fit subnet {subnet} (needs /{min}../30)")]
    BadBlockSize {
        subnet: Ipv4Network,
        block: u8,
        min: u8,
    },
    #[error("{new} overlaps {existing}")]
    Overlap {
        new: Ipv4Network,
        existing: Ipv4Network,
    },
    #[error("subnet {subnet} has no free /{block} block left")]
    NoFreeBlock { subnet: Ipv4Network, block: u8 },
    #[error("block {0} is already taken")]
    BlockTaken(Ipv4Network),
    #[error("block {0} has no free address left")]
    Exhausted(Ipv4Network),
    #[error("{address} is not an endpoint address of block {block}")]
    NotInBlock {
        address: Ipv4Addr,
        block: Ipv4Network,
    },
    #[error("{0} is not allocated")]
    NotAllocated(Ipv4Addr),
}

/// Ranges no tenant subnet may touch: the kernel treats them specially
/// (loopback, link-local, multicast, "this network", reserved and broadcast),
/// so an overlay there breaks its node or loops.
pub const RESERVED_RANGES: [(&str, [u8; 4], u8); 5] = [
    ("this network", [0, 0, 0, 0], 8),
    ("loopback", [127, 0, 0, 0], 8),
    ("link-local", [169, 254, 0, 0], 16),
    ("multicast", [224, 0, 0, 0], 4),
    ("reserved and broadcast", [240, 0, 0, 0], 4),
];

/// The reserved range `net` overlaps, if any (see [`RESERVED_RANGES`]).
pub fn reserved_overlap(net: Ipv4Network) -> Option<(&'static str, Ipv4Network)> {
    RESERVED_RANGES.iter().find_map(|&(what, ip, prefix)| {
        let range = Ipv4Network::new(ip.into(), prefix).ok()?;
        let overlaps = range.contains(net.network()) || net.contains(range.network());
        overlaps.then_some((what, range))
    })
}

/// Parses a CIDR that must name a network exactly (no host bits).
pub fn parse_network(input: &str) -> Result<Ipv4Network, IpamError> {
    let given: Ipv4Network = input
        .trim()
        .parse()
        .map_err(|e: ipnetwork::IpNetworkError| IpamError::Unparsable {
            input: input.to_string(),
            reason: e.to_string(),
        })?;
    let network =
        Ipv4Network::new(given.network(), given.prefix()).map_err(|e| IpamError::Unparsable {
            input: input.to_string(),
            reason: e.to_string(),
        })?;
    if network.ip() != given.ip() {
        return Err(IpamError::HostBitsSet { given, network });
    }
    Ok(network)
}

/// A set of networks that must not overlap (all tenants' subnets on a cluster).
#[derive(Debug, Default, Clone)]
pub struct DisjointNetworks {
    networks: Vec<Ipv4Network>,
}

impl DisjointNetworks {
    pub fn insert(&mut self, new: Ipv4Network) -> Result<(), IpamError> {
        if let Some(existing) = self.networks.iter().find(|n| overlaps(n, &new)) {
            return Err(IpamError::Overlap {
                new,
                existing: *existing,
            });
        }
        self.networks.push(new);
        Ok(())
    }

    pub fn remove(&mut self, network: Ipv4Network) -> bool {
        let before = self.networks.len();
        self.networks.retain(|n| *n != network);
        self.networks.len() != before
    }
}

pub fn overlaps(a: &Ipv4Network, b: &Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// A tenant's subnet, cut into equal per-node blocks.
#[derive(Debug, Clone)]
pub struct TenantSubnet {
    network: Ipv4Network,
    block_prefix: u8,
    taken: Bitmap,
}

impl TenantSubnet {
    pub fn new(network: Ipv4Network, block_prefix: u8) -> Result<Self, IpamError> {
        let min = network.prefix();
        // Past /30 a block has no room for a gateway and an endpoint.
        if block_prefix < min || block_prefix > 30 || block_prefix - min > 24 {
            return Err(IpamError::BadBlockSize {
                subnet: network,
                block: block_prefix,
                min,
            });
        }
        Ok(Self {
            network,
            block_prefix,
            taken: Bitmap::new(1usize << (block_prefix - min)),
        })
    }

    pub fn parse(cidr: &str, block_prefix: u8) -> Result<Self, IpamError> {
        Self::new(parse_network(cidr)?, block_prefix)
    }

    pub fn network(&self) -> Ipv4Network {
        self.network
    }

    /// Takes the lowest free block (blocks are long-lived: one per node).
    pub fn allocate_block(&mut self) -> Result<AddressBlock, IpamError> {
        let i = self
            .taken
            .first_free_from(0)
            .ok_or(IpamError::NoFreeBlock {
                subnet: self.network,
                block: self.block_prefix,
            })?;
        self.taken.set(i, true);
        AddressBlock::new(self.block_at(i))
    }

    /// Takes a specific block, e.g. one recorded before a restart.
    pub fn claim_block(&mut self, block: Ipv4Network) -> Result<AddressBlock, IpamError> {
        let i = self.index_of(block)?;
        if self.taken.get(i) {
            return Err(IpamError::BlockTaken(block));
        }
        self.taken.set(i, true);
        AddressBlock::new(block)
    }

    pub fn release_block(&mut self, block: Ipv4Network) -> Result<(), IpamError> {
        let i = self.index_of(block)?;
        self.taken.set(i, false);
        Ok(())
    }

    fn block_at(&self, i: usize) -> Ipv4Network {
        let size = 1u32 << (32 - self.block_prefix);
        let base = u32::from(self.network.network()) + size * i as u32;
        Ipv4Network::new(Ipv4Addr::from(base), self.block_prefix)
            .expect("block prefix validated in TenantSubnet::new")
    }

    fn index_of(&self, block: Ipv4Network) -> Result<usize, IpamError> {
        let inside = block.prefix() == self.block_prefix
            && self.network.contains(block.network())
            && block.ip() == block.network();
        if !inside {
            return Err(IpamError::NotInBlock {
                address: block.ip(),
                block: self.network,
            });
        }
        let offset = u32::from(block.network()) - u32::from(self.network.network());
        Ok((offset >> (32 - self.block_prefix)) as usize)
    }
}

/// One node's block of a tenant's subnet.
#[derive(Debug, Clone)]
pub struct AddressBlock {
    network: Ipv4Network,
    /// Bit i is host address network + 2 + i (after network and gateway).
    taken: Bitmap,
    cursor: usize,
}

impl AddressBlock {
    pub fn new(network: Ipv4Network) -> Result<Self, IpamError> {
        if network.prefix() > 30 || network.ip() != network.network() {
            return Err(IpamError::BadBlockSize {
                subnet: network,
                block: network.prefix(),
                min: 0,
            });
        }
        // All but the network, gateway and broadcast addresses.
        let endpoints = (1usize << (32 - network.prefix())) - 3;
        Ok(Self {
            network,
            taken: Bitmap::new(endpoints),
            cursor: 0,
        })
    }

    pub fn parse(cidr: &str) -> Result<Self, IpamError> {
        Self::new(parse_network(cidr)?)
    }

    pub fn network(&self) -> Ipv4Network {
        self.network
    }

    /// The bridge's address: the first host of the block.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network.network()) + 1)
    }

    /// The gateway with the block's prefix length, as set on the bridge.
    pub fn gateway_cidr(&self) -> Ipv4Network {
        Ipv4Network::new(self.gateway(), self.network.prefix())
            .expect("prefix comes from a valid network")
    }

    pub fn capacity(&self) -> usize {
        self.taken.len()
    }

    pub fn in_use(&self) -> usize {
        self.taken.count()
    }

    /// Whether `address` is an endpoint address of this block handed out.
    pub fn is_allocated(&self, address: Ipv4Addr) -> bool {
        self.index_of(address).is_ok_and(|i| self.taken.get(i))
    }

    /// Allocates an address; returned with the block's prefix length.
    pub fn allocate(&mut self) -> Result<Ipv4Network, IpamError> {
        let i = self
            .taken
            .first_free_from(self.cursor)
            .or_else(|| self.taken.first_free_from(0))
            .ok_or(IpamError::Exhausted(self.network))?;
        self.taken.set(i, true);
        self.cursor = (i + 1) % self.taken.len().max(1);
        Ok(self.cidr_at(i))
    }

    /// Allocates up to `n` addresses; fewer if the block runs out.
    pub fn allocate_many(&mut self, n: usize) -> Vec<Ipv4Network> {
        (0..n).map_while(|_| self.allocate().ok()).collect()
    }

    /// Marks a specific address taken (adopting endpoints after a restart).
    pub fn reserve(&mut self, address: Ipv4Addr) -> Result<(), IpamError> {
        let i = self.index_of(address)?;
        self.taken.set(i, true);
        Ok(())
    }

    pub fn release(&mut self, address: Ipv4Addr) -> Result<(), IpamError> {
        let i = self.index_of(address)?;
        if !self.taken.get(i) {
            return Err(IpamError::NotAllocated(address));
        }
        self.taken.set(i, false);
        Ok(())
    }

    fn cidr_at(&self, i: usize) -> Ipv4Network {
        let ip = Ipv4Addr::from(u32::from(self.network.network()) + 2 + i as u32);
        Ipv4Network::new(ip, self.network.prefix()).expect("prefix comes from a valid network")
    }

    fn index_of(&self, address: Ipv4Addr) -> Result<usize, IpamError> {
        let offset = u32::from(address).wrapping_sub(u32::from(self.network.network()));
        match offset.checked_sub(2) {
            Some(i) if self.network.contains(address) && (i as usize) < self.taken.len() => {
                Ok(i as usize)
            }
            _ => Err(IpamError::NotInBlock {
                address,
                block: self.network,
            }),
        }
    }
}

/// A fixed-size bitmap with a population count.
#[derive(Debug, Clone)]
struct Bitmap {
    words: Vec<u64>,
    len: usize,
    count: usize,
}

impl Bitmap {
    fn new(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
            len,
            count: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn count(&self) -> usize {
        self.count
    }

    fn get(&self, i: usize) -> bool {
        self.words[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize, value: bool) {
        if self.get(i) != value {
            self.words[i / 64] ^= 1 << (i % 64);
            if value {
                self.count += 1;
            } else {
                self.count -= 1;
            }
        }
    }

    /// The first clear bit at or after `start`, a word at a time.
    fn first_free_from(&self, start: usize) -> Option<usize> {
        if start >= self.len {
            return None;
        }
        let mut word = start / 64;
        let mut bits = !self.words[word] & (u64::MAX << (start % 64));
        loop {
            if bits != 0 {
                let i = word * 64 + bits.trailing_zeros() as usize;
                return (i < self.len).then_some(i);
            }
            word += 1;
            if word >= self.words.len() {
                return None;
            }
            bits = !self.words[word];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unparsable_and_host_bits_are_refused_clearly() {
        let e = parse_network("10.0.0.0/33").unwrap_err();
        assert!(matches!(e, IpamError::Unparsable { .. }), "{e}");
        let e = parse_network("banana").unwrap_err();
        assert!(e.to_string().contains("banana"), "{e}");
        let e = parse_network("10.1.2.3/16").unwrap_err();
        assert!(e.to_string().contains("10.1.0.0/16"), "{e}");
    }

    #[test]
    fn overlapping_subnets_are_refused() {
        let mut set = DisjointNetworks::default();
        set.insert(parse_network("10.1.0.0/16").unwrap()).unwrap();
        let e = set
            .insert(parse_network("10.1.128.0/17").unwrap())
            .unwrap_err();
        assert!(matches!(e, IpamError::Overlap { .. }), "{e}");
        let e = set
            .insert(parse_network("10.0.0.0/8").unwrap())
            .unwrap_err();
        assert!(matches!(e, IpamError::Overlap { .. }), "{e}");
        set.insert(parse_network("10.2.0.0/16").unwrap()).unwrap();
        assert!(set.remove(parse_network("10.1.0.0/16").unwrap()));
        set.insert(parse_network("10.1.0.0/24").unwrap()).unwrap();
    }

    #[test]
    fn subnet_splits_into_node_blocks_until_none_left() {
        let mut t = TenantSubnet::parse("10.9.0.0/22", 24).unwrap();
        let blocks: Vec<_> = (0..4)
            .map(|_| t.allocate_block().unwrap().network())
            .collect();
        assert_eq!(blocks[0].to_string(), "10.9.0.0/24");
        assert_eq!(blocks[3].to_string(), "10.9.3.0/24");
        assert!(matches!(
            t.allocate_block(),
            Err(IpamError::NoFreeBlock { .. })
        ));
        t.release_block(blocks[2]).unwrap();
        assert_eq!(t.allocate_block().unwrap().network(), blocks[2]);
        assert!(t.claim_block(blocks[1]).is_err());
        assert!(matches!(
            TenantSubnet::parse("10.9.0.0/22", 20),
            Err(IpamError::BadBlockSize { .. })
        ));
        assert!(matches!(
            TenantSubnet::parse("10.9.0.0/22", 31),
            Err(IpamError::BadBlockSize { .. })
        ));
    }

    #[test]
    fn block_hands_out_every_address_once_then_says_exhausted() {
        let mut b = AddressBlock::parse("10.0.0.0/29").unwrap();
        assert_eq!(b.gateway(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(b.capacity(), 5);
        let got: Vec<_> = (0..5).map(|_| b.allocate().unwrap()).collect();
        assert_eq!(got[0].to_string(), "10.0.0.2/29");
        assert_eq!(got[4].to_string(), "10.0.0.6/29");
        let e = b.allocate().unwrap_err();
        assert_eq!(e, IpamError::Exhausted(b.network()));
        assert!(e.to_string().contains("no free address"));
        assert_eq!(b.in_use(), 5);
    }

    #[test]
    fn released_addresses_come_back_last() {
        let mut b = AddressBlock::parse("10.0.0.0/28").unwrap();
        let a = b.allocate().unwrap();
        let second = b.allocate().unwrap();
        b.release(a.ip()).unwrap();
        let next = b.allocate().unwrap();
        assert_ne!(next, a, "next-fit must not reuse at once");
        assert_ne!(next, second);
        assert!(matches!(b.release(a.ip()), Err(IpamError::NotAllocated(_))));
        let outside = Ipv4Addr::new(10, 0, 1, 2);
        assert!(matches!(
            b.release(outside),
            Err(IpamError::NotInBlock { .. })
        ));
        assert!(matches!(
            b.release(b.gateway()),
            Err(IpamError::NotInBlock { .. })
        ));
    }

    #[test]
    fn allocate_many_stops_at_exhaustion() {
        let mut b = AddressBlock::parse("10.0.0.0/29").unwrap();
        assert_eq!(b.allocate_many(10).len(), 5);
        assert!(b.allocate_many(1).is_empty());
    }

    #[test]
    fn bitmap_scans_across_words() {
        let mut m = Bitmap::new(130);
        for i in 0..129 {
            m.set(i, true);
        }
        assert_eq!(m.first_free_from(0), Some(129));
        m.set(129, true);
        assert_eq!(m.first_free_from(0), None);
        m.set(64, false);
        assert_eq!(m.first_free_from(65), None);
        assert_eq!(m.first_free_from(3), Some(64));
    }
}
