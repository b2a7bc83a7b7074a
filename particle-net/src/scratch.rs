//! A throwaway namespace with a bridge in it: where tests and benchmarks build
//! endpoints, so nothing ever lands in the machine's own namespace. It is held
//! by fd (and, when a tool needs a path, mounted under the run's prefix): when
//! it goes, the kernel removes everything inside it.

use crate::bridge::Bridge;
use crate::endpoint::{Endpoint, EndpointFactory, EndpointSpec, FactoryConfig, ENDPOINT_IFINDEX};
use crate::ipam::AddressBlock;
use crate::names::{IfName, RunPrefix};
use crate::netlink::NetlinkSocket;
use crate::netns::NetNs;
use crate::overlay::Underlay;
use crate::EndpointError;

/// A scratch namespace with a bridge whose address is `block`'s gateway.
#[derive(Debug)]
pub struct ScratchNode {
    pub netns: NetNs,
    pub socket: NetlinkSocket,
    pub bridge: Bridge,
    pub block: AddressBlock,
    pub prefix: RunPrefix,
}

impl ScratchNode {
    pub fn new(prefix: &RunPrefix, block: AddressBlock) -> Result<Self, EndpointError> {
        let (netns, socket) = NetNs::create_with(NetlinkSocket::open)?;
        let netns = netns.into_managed();
        let mut socket = socket?;
        // Traffic to the namespace's own addresses goes through loopback.
        socket.execute_all(&[crate::netlink::Request::change(
            "set lo up",
            crate::netlink::messages::set_up(crate::netlink::messages::LOOPBACK_INDEX),
        )])?;
        let bridge_name: IfName = prefix.ifname('b', 0)?;
        let bridge = Bridge::create(&mut socket, &bridge_name, Some(block.gateway_cidr()))?;
        Ok(Self {
            netns,
            socket,
            bridge,
            block,
            prefix: prefix.clone(),
        })
    }

    /// A factory that builds endpoints attached to this node's bridge,
    /// their ports locked as a tenant's are.
    pub fn factory(&self, workers: usize) -> Result<EndpointFactory, EndpointError> {
        self.factory_with(workers, true)
    }

    fn factory_with(
        &self,
        workers: usize,
        lock_ports: bool,
    ) -> Result<EndpointFactory, EndpointError> {
        EndpointFactory::new(FactoryConfig {
            home: self.netns.try_clone()?,
            bridge_index: Some(self.bridge.index),
            lock_ports,
            prefix: self.prefix.clone(),
            workers,
        })
    }

    /// `n` simulated hosts on this namespace's bridge, as docs/design.md's "one
    /// machine, many nodes" has them: each a namespace whose `eth0` is its
    /// underlay interface, with an address from this node's block. Their
    /// ports are not locked: a host may route other addresses' packets
    /// (the CNI bridge baseline's host-gw routes do), as on a real network.
    pub fn hosts(&mut self, n: usize) -> Result<Vec<Endpoint>, EndpointError> {
        let specs = EndpointSpec::allocate(&mut self.block, n);
        self.factory_with(1, false)?
            .create_batch(&specs)
            .into_iter()
            .collect()
    }

    /// The underlay of a host made by [`Self::hosts`].
    pub fn underlay_of(host: &Endpoint) -> Underlay {
        Underlay {
            index: ENDPOINT_IFINDEX,
            address: host.address().ip(),
        }
    }

    /// Links in the node's namespace other than `lo` and the bridge.
    pub fn extra_links(&mut self) -> Result<Vec<String>, EndpointError> {
        let bridge = self.bridge.name.as_str().to_string();
        Ok(crate::endpoint::list_links(&mut self.socket)?
            .into_iter()
            .map(|l| l.name)
            .filter(|n| n != "lo" && *n != bridge)
            .collect())
    }
}
