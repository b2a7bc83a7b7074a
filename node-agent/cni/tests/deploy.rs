//! The Kubernetes example in deploy/kubernetes: every manifest parses
//! (multi-document YAML), has the fields its kind needs, and refers only to
//! what exists: selectors match labels, volumes are declared, secrets and
//! config maps exist, the Service reaches the controller's port and the
//! agent is pointed at it, and the plugin's conflist names this plugin with
//! the agent socket the DaemonSet actually mounts and serves. A broken copy
//! must fail, so the checks are shown to bite.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rscni_plugin::types::NetConf;
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

fn parse_all(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("every document parses"))
        .filter(|v| !v.is_null())
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// `--flag=value` of a container's command.
fn flag<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["command"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(&format!("--{name}=")))
}

/// Every problem found; empty means valid.
fn validate(docs: &[Value], conflist_file: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut by_kind: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for d in docs {
        for field in ["apiVersion", "kind"] {
            if s(&d[field]).is_empty() {
                problems.push(format!("a document without {field}: {d}"));
            }
        }
        if s(&d["metadata"]["name"]).is_empty() {
            problems.push(format!("{} without metadata.name", d["kind"]));
        }
        by_kind
            .entry(s(&d["kind"]).to_string())
            .or_default()
            .push(d);
    }
    let named = |kind: &str, name: &str| {
        by_kind
            .get(kind)
            .is_some_and(|v| v.iter().any(|d| s(&d["metadata"]["name"]) == name))
    };
    for kind in [
        "Namespace",
        "Secret",
        "Deployment",
        "Service",
        "DaemonSet",
        "ConfigMap",
    ] {
        if !by_kind.contains_key(kind) {
            problems.push(format!("no {kind}"));
        }
    }
    for d in docs.iter().filter(|d| d["kind"] != "Namespace") {
        let ns = s(&d["metadata"]["namespace"]);
        if !named("Namespace", ns) {
            problems.push(format!(
                "{} {} is in undeclared namespace {ns:?}",
                d["kind"], d["metadata"]["name"]
            ));
        }
    }

    // Workloads: selector ⊆ template labels, containers complete, volumes declared.
    for d in by_kind
        .values()
        .flatten()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "DaemonSet")
    {
        let name = s(&d["metadata"]["name"]);
        let template = &d["spec"]["template"];
        let selector = d["spec"]["selector"]["matchLabels"].as_object();
        match selector {
            Some(sel) if !sel.is_empty() => {
                for (k, v) in sel {
                    if template["metadata"]["labels"][k] != *v {
                        problems.push(format!(
                            "{name}: selector {k}={v} matches no template label"
                        ));
                    }
                }
            }
            _ => problems.push(format!("{name}: no spec.selector.matchLabels")),
        }
        let volumes: Vec<&Value> = template["spec"]["volumes"]
            .as_array()
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        for v in &volumes {
            if let Some(secret) = v["secret"]["secretName"].as_str() {
                if !named("Secret", secret) {
                    problems.push(format!("{name}: volume uses missing Secret {secret}"));
                }
            }
            if let Some(cm) = v["configMap"]["name"].as_str() {
                if !named("ConfigMap", cm) {
                    problems.push(format!("{name}: volume uses missing ConfigMap {cm}"));
                }
            }
        }
        let containers = ["initContainers", "containers"]
            .iter()
            .filter_map(|k| template["spec"][k].as_array())
            .flatten();
        let mut any = false;
        for c in containers {
            any = true;
            if s(&c["name"]).is_empty() || s(&c["image"]).is_empty() {
                problems.push(format!("{name}: a container without name or image"));
            }
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                if !volumes.iter().any(|v| v["name"] == m["name"]) {
                    problems.push(format!("{name}: mount of undeclared volume {}", m["name"]));
                }
            }
        }
        if !any {
            problems.push(format!("{name}: no containers"));
        }
    }

    // The controller behind its Service, and the agent pointed at it.
    let controller = by_kind.get("Deployment").and_then(|v| v.first());
    let service = by_kind.get("Service").and_then(|v| v.first());
    let agent_ds = by_kind.get("DaemonSet").and_then(|v| v.first());
    if let (Some(dep), Some(svc), Some(ds)) = (controller, service, agent_ds) {
        let labels = &dep["spec"]["template"]["metadata"]["labels"];
        for (k, v) in svc["spec"]["selector"].as_object().into_iter().flatten() {
            if labels[k] != *v {
                problems.push(format!(
                    "Service selector {k}={v} matches no controller pod"
                ));
            }
        }
        let ctrl = &dep["spec"]["template"]["spec"]["containers"][0];
        let port = &svc["spec"]["ports"][0];
        let target = &port["targetPort"];
        let container_port = ctrl["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == *target || p["containerPort"] == *target);
        match container_port {
            None => problems.push(format!("Service targetPort {target} is no controller port")),
            Some(p) => {
                let listen_port = flag(ctrl, "listen").and_then(|l| l.rsplit(':').next());
                if listen_port != Some(&p["containerPort"].to_string()) {
                    problems.push(format!(
                        "controller listens on {listen_port:?}, not its containerPort {}",
                        p["containerPort"]
                    ));
                }
            }
        }
        let service_addr = format!("{}:{}", s(&svc["spec"]["clusterIP"]), port["port"]);
        let spec = &ds["spec"]["template"]["spec"];
        let agent = &spec["containers"][0];
        if flag(agent, "controller") != Some(service_addr.as_str()) {
            problems.push(format!(
                "agent's --controller {:?} is not the Service {service_addr}",
                flag(agent, "controller")
            ));
        }
        if spec["hostNetwork"] != Value::Bool(true) {
            problems.push("agent DaemonSet without hostNetwork".into());
        }
        if agent["securityContext"]["privileged"] != Value::Bool(true) {
            problems.push("agent not privileged".into());
        }
        let host_path_mounted = |host: &str| {
            spec["volumes"].as_array().into_iter().flatten().any(|v| {
                v["hostPath"]["path"] == host
                    && ["initContainers", "containers"].iter().any(|k| {
                        spec[k].as_array().into_iter().flatten().any(|c| {
                            c["volumeMounts"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|m| m["name"] == v["name"] && m["mountPath"] == host)
                        })
                    })
            })
        };
        for path in ["/run/particle", "/opt/cni/bin", "/etc/cni/net.d"] {
            if !host_path_mounted(path) {
                problems.push(format!("no hostPath {path} mounted at the same path"));
            }
        }

        // The conflist: the ConfigMap's copy is the file's, it names this
        // plugin first with a config the plugin accepts, and its agent socket
        // is the one the agent serves, on a host path the agent mounts.
        let cm = by_kind.get("ConfigMap").and_then(|v| v.first());
        let data = cm
            .map(|c| s(&c["data"]["10-particle.conflist"]))
            .unwrap_or("");
        if data.trim() != conflist_file.trim() {
            problems.push("the ConfigMap's conflist differs from 10-particle.conflist".into());
        }
        match serde_json::from_str::<Value>(data) {
            Err(e) => problems.push(format!("the conflist is not JSON: {e}")),
            Ok(list) => {
                let first = &list["plugins"][0];
                if first["type"] != env!("CARGO_PKG_NAME") {
                    problems.push(format!(
                        "the conflist's first plugin is {}, not particle-cni",
                        first["type"]
                    ));
                }
                let mut conf = first.clone();
                conf["name"] = list["name"].clone();
                conf["cniVersion"] = list["cniVersion"].clone();
                match serde_json::from_value::<NetConf>(conf)
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        particle_cni::config::PluginConfig::from_netconf(&c)
                            .map_err(|e| format!("{e:?}"))
                    }) {
                    Err(e) => problems.push(format!("particle-cni rejects the conflist: {e}")),
                    Ok(c) => {
                        let socket = c.agent_socket.to_string_lossy().into_owned();
                        if flag(agent, "socket") != Some(socket.as_str()) {
                            problems.push(format!(
                                "agentSocket {socket} is not the agent's --socket {:?}",
                                flag(agent, "socket")
                            ));
                        }
                        let dir = c
                            .agent_socket
                            .parent()
                            .map(|p| p.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        if !host_path_mounted(&dir) {
                            problems.push(format!(
                                "agentSocket's directory {dir} is not a hostPath the agent mounts"
                            ));
                        }
                    }
                }
            }
        }
    }
    problems
}

fn load() -> (Vec<Value>, String) {
    let yaml = std::fs::read_to_string(deploy_dir().join("particle.yaml")).unwrap();
    let conflist = std::fs::read_to_string(deploy_dir().join("10-particle.conflist")).unwrap();
    (parse_all(&yaml), conflist)
}

#[test]
fn the_kubernetes_example_is_complete_and_consistent() {
    let (docs, conflist) = load();
    assert_eq!(
        docs.len(),
        6,
        "Namespace, Secret, Deployment, Service, DaemonSet, ConfigMap"
    );
    let problems = validate(&docs, &conflist);
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn broken_copies_are_caught() {
    let (docs, conflist) = load();
    let find =
        |docs: &mut Vec<Value>, kind: &str| docs.iter().position(|d| d["kind"] == kind).unwrap();
    type Breakage = Box<dyn Fn(&mut Vec<Value>)>;
    let breakages: Vec<(&str, Breakage)> = vec![
        (
            "selector",
            Box::new(move |d: &mut Vec<Value>| {
                let i = find(d, "Service");
                d[i]["spec"]["selector"]["app.kubernetes.io/name"] = "nobody".into();
            }),
        ),
        (
            "Secret",
            Box::new(move |d: &mut Vec<Value>| {
                let i = find(d, "Secret");
                d.remove(i);
            }),
        ),
        (
            "--controller",
            Box::new(move |d: &mut Vec<Value>| {
                let i = find(d, "Service");
                d[i]["spec"]["clusterIP"] = "10.96.0.78".into();
            }),
        ),
        (
            "agentSocket",
            Box::new(move |d: &mut Vec<Value>| {
                let i = find(d, "DaemonSet");
                let cmd = &mut d[i]["spec"]["template"]["spec"]["containers"][0]["command"];
                for a in cmd.as_array_mut().unwrap() {
                    if s(a).starts_with("--socket=") {
                        *a = "--socket=/run/elsewhere.sock".into();
                    }
                }
            }),
        ),
        (
            "undeclared volume",
            Box::new(move |d: &mut Vec<Value>| {
                let i = find(d, "DaemonSet");
                d[i]["spec"]["template"]["spec"]["volumes"]
                    .as_array_mut()
                    .unwrap()
                    .remove(0);
            }),
        ),
    ];
    for (what, breakage) in breakages {
        let mut broken = docs.clone();
        breakage(&mut broken);
        assert!(
            !validate(&broken, &conflist).is_empty(),
            "{what}: not caught"
        );
    }
    assert!(
        !validate(&docs, "{}").is_empty(),
        "a conflist file that differs: not caught"
    );
}
