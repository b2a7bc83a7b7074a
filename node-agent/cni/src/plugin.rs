//! The CNI operations.

use std::net::{IpAddr, Ipv4Addr};

use rscni_plugin::cni::Cni;
use rscni_plugin::error::Error;
use rscni_plugin::types::{Args, CNIResult, Interface, IpConfig, Route};
use rscni_types::ipnet::{IpNet, Ipv4Net};

use crate::agent::{AgentClient, AgentError, Attachment, AttachmentKey};
use crate::config::PluginConfig;

/// Plugin-specific error code (the spec reserves 0-99) for an agent that
/// answered but refused.
pub const AGENT_REFUSED: u32 = 100;

pub struct ParticleCni;

fn client(config: &PluginConfig) -> AgentClient {
    AgentClient::new(&config.agent_socket, config.timeout)
}

fn agent_error(e: AgentError) -> Error {
    match e {
        // Transient on a node whose agent is (re)starting: the runtime retries.
        AgentError::NotRunning { .. } | AgentError::Io { .. } => {
            Error::TryAgainLater(e.to_string())
        }
        AgentError::Refused(why) => Error::Custom(
            AGENT_REFUSED,
            "The Particle agent refused the request".into(),
            why,
        ),
    }
}

/// CNI_CONTAINERID, CNI_IFNAME (and CNI_NETNS when `need_netns`): the library
/// checks the spec's required variables; these are the values.
fn identity(args: &Args, need_netns: bool) -> Result<(String, String, String), Error> {
    let missing = |v: &str| Error::InvalidEnvValue(format!("{v} is required"));
    let container_id = args
        .container_id()
        .map(|c| c.as_ref().to_string())
        .ok_or_else(|| missing("CNI_CONTAINERID"))?;
    let ifname = args
        .ifname()
        .map(|i| i.as_ref().to_string())
        .ok_or_else(|| missing("CNI_IFNAME"))?;
    let netns = match args.netns() {
        Some(p) => p.to_string_lossy().into_owned(),
        None if need_netns => return Err(missing("CNI_NETNS")),
        None => String::new(),
    };
    Ok((container_id, ifname, netns))
}

/// The attachment as a CNI result, after whatever the previous plugin
/// reported (chaining): its interfaces, addresses and routes come first.
pub fn result_for(
    attachment: &Attachment,
    prev: Option<&CNIResult>,
    dns: Option<&rscni_plugin::types::Dns>,
) -> Result<CNIResult, Error> {
    let bad = |what: &str, value: &str| {
        Error::Custom(
            AGENT_REFUSED + 1,
            "The Particle agent sent a malformed attachment".into(),
            format!("{what} {value:?}"),
        )
    };
    let address: IpNet = attachment
        .address
        .parse()
        .map_err(|_| bad("address", &attachment.address))?;
    let gateway: IpAddr = attachment
        .gateway
        .parse()
        .map_err(|_| bad("gateway", &attachment.gateway))?;
    let mut result = prev.cloned().unwrap_or_default();
    let index =
        u32::try_from(result.interfaces.len()).map_err(|_| bad("interfaces", "too many"))?;
    result.interfaces.push(Interface {
        name: attachment.ifname.clone(),
        mac: attachment.mac.clone(),
        mtu: None,
        sandbox: Some(attachment.netns.clone()),
        socket_path: None,
        pci_id: None,
    });
    result.ips.push(IpConfig {
        interface: Some(index),
        address,
        gateway: Some(gateway),
    });
    result.routes.push(Route {
        dst: IpNet::V4(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).map_err(|_| bad("route", "0/0"))?),
        gw: Some(gateway),
        mtu: None,
        advmss: None,
        priority: None,
        table: None,
        scope: None,
    });
    if let Some(dns) = dns {
        result.dns = Some(dns.clone());
    }
    Ok(result)
}

impl Cni for ParticleCni {
    fn add(&self, args: Args) -> Result<CNIResult, Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        let (container_id, ifname, netns) = identity(&args, true)?;
        let attachment = client(&config)
            .attach(&config, &container_id, &ifname, &netns)
            .map_err(agent_error)?;
        result_for(
            &attachment,
            args.config().prev_result.as_ref(),
            args.config().dns.as_ref(),
        )
    }

    fn del(&self, args: Args) -> Result<(), Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        let (container_id, ifname, _) = identity(&args, false)?;
        match client(&config).detach(&container_id, &ifname) {
            Ok(_) => Ok(()),
            // No agent: whatever it lent went away with it (its tenant routers
            // hold the other ends of the veth pairs), so there is nothing to undo.
            Err(AgentError::NotRunning { .. }) => Ok(()),
            Err(e) => Err(agent_error(e)),
        }
    }

    fn check(&self, args: Args) -> Result<(), Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        let (container_id, ifname, _) = identity(&args, true)?;
        let attachment = client(&config)
            .check(&container_id, &ifname)
            .map_err(agent_error)?;
        // The runtime's cached result must still describe what is there.
        let prev = args
            .config()
            .prev_result
            .as_ref()
            .ok_or_else(|| Error::InvalidNetworkConfig("CHECK needs prevResult".into()))?;
        let expected: IpNet = attachment
            .address
            .parse()
            .map_err(|_| Error::InvalidNetworkConfig("malformed attachment address".into()))?;
        let listed = prev.interfaces.iter().position(|i| i.name == ifname);
        let addressed = prev.ips.iter().any(|ip| {
            ip.address == expected && ip.interface.map(|i| i as usize) == listed && listed.is_some()
        });
        if !addressed {
            return Err(Error::Custom(
                AGENT_REFUSED + 2,
                "prevResult does not match the attachment".into(),
                format!("expected {ifname} with {expected} in prevResult"),
            ));
        }
        Ok(())
    }

    fn status(&self, args: Args) -> Result<(), Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        let tenants = client(&config)
            .tenants()
            .map_err(|e| Error::PluginNotAvailable(e.to_string()))?;
        if tenants.contains(&config.tenant) {
            Ok(())
        } else {
            Err(Error::PluginNotAvailable(format!(
                "the agent has no network for tenant {:?} (yet)",
                config.tenant
            )))
        }
    }

    fn gc(&self, args: Args) -> Result<(), Error> {
        let config = PluginConfig::from_netconf(args.config())?;
        let valid: Vec<AttachmentKey> = args
            .config()
            .valid_attachments
            .iter()
            .flatten()
            .map(|a| AttachmentKey {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect();
        match client(&config).gc(&config.network, &valid) {
            Ok(_) | Err(AgentError::NotRunning { .. }) => Ok(()),
            Err(e) => Err(agent_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment() -> Attachment {
        Attachment {
            container_id: "c".into(),
            ifname: "eth1".into(),
            tenant: "a".into(),
            netns: "/run/netns/x".into(),
            address: "10.1.0.5/24".into(),
            gateway: "10.1.0.1".into(),
            mac: "02:00:00:00:00:01".into(),
            network: "n".into(),
            mode: particle_wire::local::AttachMode::Plug,
        }
    }

    #[test]
    fn a_result_of_its_own() {
        let r = result_for(&attachment(), None, None).unwrap();
        assert_eq!(r.interfaces.len(), 1);
        assert_eq!(r.interfaces[0].sandbox.as_deref(), Some("/run/netns/x"));
        assert_eq!(r.ips[0].interface, Some(0));
        assert_eq!(r.ips[0].address.to_string(), "10.1.0.5/24");
        assert_eq!(r.routes[0].dst.to_string(), "0.0.0.0/0");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["ips"][0]["gateway"], "10.1.0.1");
    }

    #[test]
    fn chained_after_another_plugin() {
        let prev: CNIResult = serde_json::from_str(
            r#"{"interfaces":[{"name":"eth0","mac":"02:00:00:00:00:09","sandbox":"/run/netns/x"}],
                "ips":[{"interface":0,"address":"192.168.9.2/24"}],
                "routes":[{"dst":"192.168.0.0/16"}],
                "dns":{"nameservers":["192.168.9.1"]}}"#,
        )
        .unwrap();
        let r = result_for(&attachment(), Some(&prev), None).unwrap();
        assert_eq!(r.interfaces.len(), 2);
        assert_eq!(r.interfaces[0].name, "eth0");
        assert_eq!(
            r.ips[1].interface,
            Some(1),
            "our address names our interface"
        );
        assert_eq!(r.routes.len(), 2);
        assert_eq!(r.dns, prev.dns, "kept when we configure none");
    }

    #[test]
    fn a_garbled_attachment_is_an_error_not_a_panic() {
        let mut a = attachment();
        a.address = "nonsense".into();
        assert!(result_for(&a, None, None).is_err());
    }
}
