//! `deploy/kubernetes/` and `deploy/container/Containerfile` agree with
//! each other and with the proxy:
//! - every manifest validates offline against the Kubernetes schemas (the
//!   `kubernetes-validate` package, installed by `make setup`), for the
//!   oldest Kubernetes the manifests claim (1.30, the `sleep` preStop
//!   action) and the newest the package ships;
//! - the config in the ConfigMap is valid for the proxy (`trellis::config::load`
//!   and the real `trellis check-config`), and holds no secret;
//! - ports, probe services, the grace period, the config path, selectors
//!   and the binaries in the image agree across the files.
//!
//! Every failure names the files and fields that disagree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_yaml::Value;
use trellis::config::{Config, load};

/// The oldest Kubernetes the manifests are written for: the native `sleep`
/// preStop action is on by default from 1.30.
const OLDEST_KUBERNETES: &str = "1.30.0";

/// trellis-postgres's password variable (`trellis_postgres::PASSWORD_ENV`,
/// libpq's name).
const PG_PASSWORD_ENV: &str = "PGPASSWORD";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn kube_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

/// One parsed manifest and the name it is reported by.
struct Manifest {
    file: String,
    doc: Value,
}

impl Manifest {
    fn read(name: &str) -> Manifest {
        let file = format!("deploy/kubernetes/{name}");
        let text = std::fs::read_to_string(repo().join(&file))
            .unwrap_or_else(|e| panic!("{file}: cannot read it: {e}"));
        let doc = serde_yaml::from_str(&text)
            .unwrap_or_else(|e| panic!("{file}: not one YAML document: {e}"));
        Manifest { file, doc }
    }

    /// The value at `path` (`spec.template.spec.containers[0].ports`), or a
    /// panic naming the file and the field.
    fn at(&self, path: &str) -> &Value {
        self.find(path)
            .unwrap_or_else(|| panic!("{}: {path} is missing", self.file))
    }

    fn find(&self, path: &str) -> Option<&Value> {
        find(&self.doc, path)
    }

    fn str(&self, path: &str) -> &str {
        self.at(path)
            .as_str()
            .unwrap_or_else(|| panic!("{}: {path} is not a string", self.file))
    }

    fn u64(&self, path: &str) -> u64 {
        self.at(path)
            .as_u64()
            .unwrap_or_else(|| panic!("{}: {path} is not a whole number", self.file))
    }

    /// A `matchLabels`-like map of strings at `path`.
    fn labels(&self, path: &str) -> BTreeMap<String, String> {
        let map = self
            .at(path)
            .as_mapping()
            .unwrap_or_else(|| panic!("{}: {path} is not a map", self.file));
        map.iter()
            .map(|(k, v)| {
                let k = k.as_str().unwrap_or_default().to_string();
                let v = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{}: {path}.{k} is not a string", self.file));
                (k, v.to_string())
            })
            .collect()
    }
}

/// `a.b[2].c` in `v`.
fn find<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.') {
        let (key, index) = match part.split_once('[') {
            Some((k, rest)) => (k, Some(rest.trim_end_matches(']').parse::<usize>().ok()?)),
            None => (part, None),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        if let Some(i) = index {
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

const CONTAINER: &str = "spec.template.spec.containers[0]";

fn deployment() -> Manifest {
    let d = Manifest::read("deployment.yaml");
    assert_eq!(d.str("kind"), "Deployment", "{}: kind", d.file);
    let containers = d
        .at("spec.template.spec.containers")
        .as_sequence()
        .map_or(0, Vec::len);
    assert_eq!(
        containers, 1,
        "{}: spec.template.spec.containers: Trellis and its patterns run in ONE container \
         (the proxy spawns and stops its patterns itself)",
        d.file
    );
    d
}

/// The config file in the ConfigMap: its manifest, the data key and the text.
fn configmap() -> (Manifest, String, String) {
    let cm = Manifest::read("configmap.yaml");
    assert_eq!(cm.str("kind"), "ConfigMap", "{}: kind", cm.file);
    let data = cm
        .at("data")
        .as_mapping()
        .unwrap_or_else(|| panic!("{}: data is not a map", cm.file));
    assert_eq!(
        data.len(),
        1,
        "{}: data should hold exactly the one config file",
        cm.file
    );
    let (key, text) = data.iter().next().expect("one entry");
    let key = key.as_str().expect("a string key").to_string();
    let text = text
        .as_str()
        .unwrap_or_else(|| panic!("{}: data.{key} is not a string", cm.file))
        .to_string();
    (cm, key, text)
}

/// The Deployment container's literal `env` values (what the proxy sees,
/// besides values from Secrets).
fn container_env(d: &Manifest) -> Vec<(String, String)> {
    d.find(&format!("{CONTAINER}.env"))
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e.get("name")?.as_str()?.to_string(),
                e.get("value")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

/// The config as the pod's proxy loads it: the ConfigMap's text, written to
/// a file, with the container's literal environment applied.
fn loaded_config() -> (Config, tempfile::TempDir, PathBuf) {
    let (cm, key, text) = configmap();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(&key);
    std::fs::write(&path, &text).expect("write the config");
    let env = container_env(&deployment());
    let loaded = load(Some(&path), env).unwrap_or_else(|e| {
        panic!(
            "{}: data.{key} is not a valid trellis config:\n{e}",
            cm.file
        )
    });
    (loaded.config, dir, path)
}

// Schemas ---------------------------------------------------------------------

/// The manifests kubectl applies (kustomization.yaml is kustomize's own
/// file, with no Kubernetes schema).
fn manifest_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(kube_dir())
        .expect("deploy/kubernetes/ exists")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    files
}

fn kubernetes_validate(version: Option<&str>, files: &[String]) {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let present = Command::new(&python)
        .args(["-c", "import kubernetes_validate"])
        .output();
    match present {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the Python package kubernetes_validate is not installed for {python} ({}): run \
             `make setup` (scripts/setup-backends.sh installs it with pip)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run {python} ({e}): install Python 3, then run `make setup` \
             (scripts/setup-backends.sh installs kubernetes-validate with pip)"
        ),
    }
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    if let Some(v) = version {
        cmd.args(["-k", v]);
    }
    let out = cmd
        .args(files)
        .current_dir(kube_dir())
        .output()
        .expect("run kubernetes_validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let against = version.unwrap_or("the newest version it ships");
    assert!(
        out.status.success(),
        "kubernetes-validate --strict against Kubernetes {against} rejected deploy/kubernetes/:\n{text}"
    );
    for f in files {
        assert!(
            text.lines()
                .any(|l| l.contains(f.as_str()) && l.contains(" passed ")),
            "deploy/kubernetes/{f} was not validated against Kubernetes {against} \
             (no schema for its kind?):\n{text}"
        );
    }
}

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let files = manifest_files();
    for expected in [
        "configmap.yaml",
        "deployment.yaml",
        "pdb.yaml",
        "service.yaml",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "deploy/kubernetes/{expected} is missing (found {files:?})"
        );
    }
    kubernetes_validate(Some(OLDEST_KUBERNETES), &files);
    kubernetes_validate(None, &files);
}

#[test]
fn kustomization_lists_every_manifest() {
    let k = Manifest::read("kustomization.yaml");
    let listed: BTreeSet<String> = k
        .at("resources")
        .as_sequence()
        .unwrap_or_else(|| panic!("{}: resources is not a list", k.file))
        .iter()
        .filter_map(|r| r.as_str().map(str::to_string))
        .collect();
    let present: BTreeSet<String> = manifest_files().into_iter().collect();
    assert_eq!(
        listed, present,
        "{}: resources must list exactly the manifests in deploy/kubernetes/",
        k.file
    );
}

// The config ------------------------------------------------------------------

#[test]
fn the_configmap_holds_a_valid_config_that_listens_on_the_pod_ip() {
    let (config, dir, path) = loaded_config();
    // The real binary too: `check-config` also resolves every pattern's
    // command, here next to target/debug/trellis as in the image's folder,
    // and loads the TLS files, here a test certificate where the Secret
    // `trellis-tls` would be mounted.
    let tls = config.tls.as_ref().expect("configmap.yaml turns TLS on");
    let mounted = tls.cert_file.parent().expect("a folder");
    let certs = dir.path().join("tls");
    std::fs::create_dir(&certs).unwrap();
    trellis_tests::pki::Ca::new("test")
        .server()
        .write(&certs, "tls");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace(&mounted.display().to_string(), &certs.display().to_string());
    std::fs::write(&path, text).unwrap();
    let out = Command::new(trellis_tests::bin("trellis"))
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run trellis check-config");
    assert!(
        out.status.success(),
        "trellis check-config rejects the config in deploy/kubernetes/configmap.yaml:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        config.listen.grpc.ip().is_unspecified(),
        "deploy/kubernetes/configmap.yaml: listen.grpc is {}: probes and the Service reach the \
         pod on its IP, so it must be 0.0.0.0:PORT",
        config.listen.grpc
    );
    let http = config.listen.http.expect(
        "deploy/kubernetes/configmap.yaml: listen.http is off, but service.yaml has an http port",
    );
    assert!(
        http.ip().is_unspecified(),
        "deploy/kubernetes/configmap.yaml: listen.http is {http}: it must be 0.0.0.0:PORT"
    );
    let backed: BTreeSet<&str> = config.patterns.iter().map(|p| p.command.as_str()).collect();
    for shared in ["trellis-redis", "trellis-postgres", "trellis-nats"] {
        assert!(
            backed.contains(shared),
            "deploy/kubernetes/configmap.yaml: no pattern runs {shared}; the replicas share \
             Redis, PostgreSQL and NATS"
        );
    }
}

/// Secrets come from a Secret through the environment, never from the
/// ConfigMap.
#[test]
fn no_secret_in_the_configmap_and_the_postgres_password_comes_from_a_secret() {
    let (config, _dir, _path) = loaded_config();
    for (i, p) in config.patterns.iter().enumerate() {
        let cfg = p.config.as_object().cloned().unwrap_or_default();
        assert!(
            !cfg.contains_key("password"),
            "deploy/kubernetes/configmap.yaml: patterns[{i}].config.password: a password belongs \
             in a Secret (PGPASSWORD in deployment.yaml), not in the ConfigMap"
        );
        if let Some(url) = cfg.get("url").and_then(|u| u.as_str()) {
            let authority = url.split("://").nth(1).unwrap_or(url);
            let userinfo = authority
                .split('/')
                .next()
                .unwrap_or_default()
                .rsplit_once('@')
                .map(|(u, _)| u);
            assert!(
                !userinfo.is_some_and(|u| u.contains(':')),
                "deploy/kubernetes/configmap.yaml: patterns[{i}].config.url carries a password; \
                 pass it from a Secret through the environment"
            );
        }
    }
    let d = deployment();
    let env = d
        .at(&format!("{CONTAINER}.env"))
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let pg = env
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(PG_PASSWORD_ENV))
        .unwrap_or_else(|| {
            panic!(
                "{}: {CONTAINER}.env has no {}, which trellis-postgres reads for its password",
                d.file, PG_PASSWORD_ENV
            )
        });
    assert!(
        find(pg, "valueFrom.secretKeyRef.name").is_some(),
        "{}: {CONTAINER}.env {} must come from a Secret (valueFrom.secretKeyRef), not a literal",
        d.file,
        PG_PASSWORD_ENV
    );
}

// Agreement -------------------------------------------------------------------

/// The container's ports by name.
fn container_ports(d: &Manifest) -> BTreeMap<String, u64> {
    d.at(&format!("{CONTAINER}.ports"))
        .as_sequence()
        .unwrap_or_else(|| panic!("{}: {CONTAINER}.ports is not a list", d.file))
        .iter()
        .map(|p| {
            let name = p.get("name").and_then(Value::as_str).unwrap_or_else(|| {
                panic!("{}: {CONTAINER}.ports: every port needs a name", d.file)
            });
            let port = p
                .get("containerPort")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("{}: {CONTAINER}.ports[{name}].containerPort", d.file));
            (name.to_string(), port)
        })
        .collect()
}

#[test]
fn ports_agree_across_config_container_probes_and_service() {
    let (config, _dir, _path) = loaded_config();
    let d = deployment();
    let ports = container_ports(&d);
    let grpc = u64::from(config.listen.grpc.port());
    let http = u64::from(config.listen.http.expect("listen.http is set").port());
    let listen: BTreeSet<u64> = [grpc, http].into();
    let exposed: BTreeSet<u64> = ports.values().copied().collect();
    assert_eq!(
        exposed, listen,
        "{}: {CONTAINER}.ports {ports:?} != the config's listen ports (configmap.yaml: \
         listen.grpc {grpc}, listen.http {http})",
        d.file
    );

    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let port = d.u64(&format!("{CONTAINER}.{probe}.httpGet.port"));
        assert_eq!(
            port, http,
            "{}: {CONTAINER}.{probe}.httpGet.port {port} is not listen.http's port {http} \
             (configmap.yaml): /readyz and /livez are served on the HTTP listener",
            d.file
        );
    }

    let s = Manifest::read("service.yaml");
    let service_ports = s
        .at("spec.ports")
        .as_sequence()
        .unwrap_or_else(|| panic!("{}: spec.ports is not a list", s.file));
    let mut targets = BTreeSet::new();
    for (i, p) in service_ports.iter().enumerate() {
        let target = p
            .get("targetPort")
            .or_else(|| p.get("port"))
            .unwrap_or_else(|| panic!("{}: spec.ports[{i}] has no port", s.file));
        let resolved = match target {
            Value::Number(n) => n.as_u64().expect("a port number"),
            Value::String(name) => *ports.get(name).unwrap_or_else(|| {
                panic!(
                    "{}: spec.ports[{i}].targetPort {name:?} names no port of the container \
                     ({}: {CONTAINER}.ports has {:?})",
                    s.file,
                    d.file,
                    ports.keys().collect::<Vec<_>>()
                )
            }),
            other => panic!("{}: spec.ports[{i}].targetPort is {other:?}", s.file),
        };
        targets.insert(resolved);
    }
    assert_eq!(
        targets, listen,
        "{}: spec.ports[*].targetPort resolve to {targets:?}, but the config listens on \
         {listen:?} (configmap.yaml listen.grpc / listen.http)",
        s.file
    );
}

#[test]
fn probes_ask_readiness_and_liveness_of_the_right_health_services() {
    let d = deployment();
    let (config, _dir, _path) = loaded_config();
    let path = |probe: &str| {
        let get = d
            .find(&format!("{CONTAINER}.{probe}.httpGet"))
            .unwrap_or_else(|| panic!("{}: {CONTAINER}.{probe}.httpGet is missing", d.file));
        let scheme = get.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
        // With TLS on, a plain HTTP probe never gets an answer.
        assert_eq!(
            scheme == "HTTPS",
            config.tls.is_some(),
            "{}: {CONTAINER}.{probe}.httpGet.scheme is {scheme}, but configmap.yaml {} TLS",
            d.file,
            if config.tls.is_some() {
                "turns on"
            } else {
                "has no"
            }
        );
        get.get("path")
            .and_then(Value::as_str)
            .unwrap_or("/")
            .to_string()
    };
    for probe in ["startupProbe", "readinessProbe"] {
        assert_eq!(
            path(probe),
            "/readyz",
            "{}: {CONTAINER}.{probe} must ask /readyz (health \"\": every pattern serves and \
             the proxy is not draining)",
            d.file
        );
    }
    assert_eq!(
        path("livenessProbe"),
        "/livez",
        "{}: {CONTAINER}.livenessProbe must ask /livez ({}): /readyz turns 503 when a backend \
         is down, and restarting the pod would not bring it back",
        d.file,
        trellis::health::LIVENESS
    );
}

#[test]
fn the_tls_files_are_where_the_secret_is_mounted_and_admin_stays_on_loopback() {
    let d = deployment();
    let (config, _dir, _path) = loaded_config();
    let tls = config.tls.expect("configmap.yaml turns TLS on");
    let mounts = d
        .at(&format!("{CONTAINER}.volumeMounts"))
        .as_sequence()
        .expect("volumeMounts is a list");
    let volumes = d
        .at("spec.template.spec.volumes")
        .as_sequence()
        .expect("volumes is a list");
    for file in [&tls.cert_file, &tls.key_file] {
        let mount = mounts
            .iter()
            .find(|m| {
                m.get("mountPath")
                    .and_then(Value::as_str)
                    .is_some_and(|p| file.starts_with(p) && p.ends_with("/tls"))
            })
            .unwrap_or_else(|| {
                panic!(
                    "{}: no volume is mounted where {} is",
                    d.file,
                    file.display()
                )
            });
        let name = mount.get("name").and_then(Value::as_str).unwrap_or("");
        let volume = volumes
            .iter()
            .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
            .unwrap_or_else(|| panic!("{}: volume {name} is not defined", d.file));
        assert!(
            volume.get("secret").is_some(),
            "{}: the TLS files come from a Secret, not from {volume:?}",
            d.file
        );
    }
    let admin = config.listen.admin.expect("the admin door is on");
    assert!(
        admin.ip().is_loopback(),
        "configmap.yaml: listen.admin is {admin}; keep the admin API on the pod's loopback"
    );
}

/// The preStop hook's sleep: the native `sleep` action or `exec: [sleep, N]`.
fn prestop_seconds(d: &Manifest) -> u64 {
    let field = format!("{CONTAINER}.lifecycle.preStop");
    if let Some(s) = d.find(&format!("{field}.sleep.seconds")) {
        return s
            .as_u64()
            .unwrap_or_else(|| panic!("{}: {field}.sleep.seconds", d.file));
    }
    let command: Vec<&str> = d
        .find(&format!("{field}.exec.command"))
        .and_then(Value::as_sequence)
        .unwrap_or_else(|| {
            panic!(
                "{}: {field} must sleep (sleep.seconds or exec.command [sleep, N])",
                d.file
            )
        })
        .iter()
        .filter_map(Value::as_str)
        .collect();
    match command.as_slice() {
        [sleep, n] if sleep.ends_with("sleep") => n
            .parse()
            .unwrap_or_else(|_| panic!("{}: {field}.exec.command {command:?}", d.file)),
        _ => panic!(
            "{}: {field}.exec.command {command:?} is not [sleep, N]",
            d.file
        ),
    }
}

#[test]
fn the_grace_period_covers_prestop_drain_and_pattern_stop() {
    let (config, _dir, _path) = loaded_config();
    let d = deployment();
    let prestop = Duration::from_secs(prestop_seconds(&d));
    let stop_grace = config
        .patterns
        .iter()
        .map(|p| p.stop_grace)
        .max()
        .unwrap_or_default();
    // Patterns stop together; each may wait stop_grace for its Lifecycle
    // Stop answer, again for its exit, and again after SIGTERM before it
    // is SIGKILLed (supervisor::pattern::stop_process).
    let needed = prestop + config.drain_delay + config.shutdown_grace + 3 * stop_grace;
    let grace = Duration::from_secs(d.u64("spec.template.spec.terminationGracePeriodSeconds"));
    assert!(
        grace >= needed,
        "{}: spec.template.spec.terminationGracePeriodSeconds {grace:?} < preStop sleep \
         {prestop:?} + drain_delay {:?} + shutdown_grace {:?} + 3 × the longest stop_grace \
         {stop_grace:?} (configmap.yaml) = {needed:?}: the kubelet would SIGKILL a draining proxy",
        d.file,
        config.drain_delay,
        config.shutdown_grace,
    );
    assert!(
        !config.drain_delay.is_zero(),
        "deploy/kubernetes/configmap.yaml: drain_delay 0s gives load balancers no time to stop \
         sending calls"
    );
}

#[test]
fn the_container_reads_the_config_where_the_configmap_is_mounted() {
    let d = deployment();
    let (cm, key, _) = configmap();
    let cm_name = cm.str("metadata.name");

    // The path the proxy is told: --config PATH, --config=PATH or TRELLIS_CONFIG.
    let args: Vec<&str> = d
        .find(&format!("{CONTAINER}.args"))
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let from_args = args
        .iter()
        .position(|a| *a == "--config" || *a == "-c")
        .and_then(|i| args.get(i + 1).copied())
        .or_else(|| args.iter().find_map(|a| a.strip_prefix("--config=")))
        .map(str::to_string);
    let from_env = container_env(&d)
        .into_iter()
        .find(|(k, _)| k == "TRELLIS_CONFIG")
        .map(|(_, v)| v);
    let told = from_args.or(from_env).unwrap_or_else(|| {
        panic!(
            "{}: {CONTAINER}.args has no --config PATH (nor env TRELLIS_CONFIG): the proxy would \
             run its embedded default",
            d.file
        )
    });

    // Where the ConfigMap's key lands: the volume that holds the ConfigMap,
    // its items (or the key itself), and the mount.
    let volumes = d
        .at("spec.template.spec.volumes")
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let volume = volumes
        .iter()
        .find(|v| find(v, "configMap.name").and_then(Value::as_str) == Some(cm_name))
        .unwrap_or_else(|| {
            panic!(
                "{}: spec.template.spec.volumes has no configMap volume of {cm_name:?} ({}: \
                 metadata.name)",
                d.file, cm.file
            )
        });
    let volume_name = volume.get("name").and_then(Value::as_str).unwrap_or("");
    let file_in_volume = match find(volume, "configMap.items").and_then(Value::as_sequence) {
        Some(items) => items
            .iter()
            .find(|i| i.get("key").and_then(Value::as_str) == Some(key.as_str()))
            .and_then(|i| i.get("path").and_then(Value::as_str))
            .unwrap_or_else(|| {
                panic!(
                    "{}: volume {volume_name:?} configMap.items does not project the key {key:?} \
                     of {}",
                    d.file, cm.file
                )
            })
            .to_string(),
        None => key.clone(),
    };
    let mounts = d
        .at(&format!("{CONTAINER}.volumeMounts"))
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| m.get("name").and_then(Value::as_str) == Some(volume_name))
        .unwrap_or_else(|| {
            panic!(
                "{}: {CONTAINER}.volumeMounts does not mount the volume {volume_name:?}",
                d.file
            )
        });
    let mount_path = mount.get("mountPath").and_then(Value::as_str).unwrap_or("");
    let mounted = match mount.get("subPath").and_then(Value::as_str) {
        Some(_) => mount_path.to_string(),
        None => format!("{}/{file_in_volume}", mount_path.trim_end_matches('/')),
    };
    assert_eq!(
        told, mounted,
        "{}: the proxy is told --config {told:?} ({CONTAINER}.args), but the ConfigMap's key \
         {key:?} is mounted at {mounted:?} ({CONTAINER}.volumeMounts + spec.template.spec.volumes)",
        d.file
    );
}

#[test]
fn selectors_match_the_deployment_pods() {
    let d = deployment();
    let pod_labels = d.labels("spec.template.metadata.labels");
    let subset = |m: &Manifest, path: &str| {
        let selector = m.labels(path);
        assert!(!selector.is_empty(), "{}: {path} is empty", m.file);
        for (k, v) in &selector {
            assert_eq!(
                pod_labels.get(k),
                Some(v),
                "{}: {path} {k}={v} does not match the pods' labels {pod_labels:?} ({}: \
                 spec.template.metadata.labels)",
                m.file,
                d.file
            );
        }
    };
    subset(&d, "spec.selector.matchLabels");
    subset(&Manifest::read("pdb.yaml"), "spec.selector.matchLabels");
    subset(&Manifest::read("service.yaml"), "spec.selector");

    let replicas = d.u64("spec.replicas");
    assert!(
        replicas >= 2,
        "{}: spec.replicas {replicas}: run at least two",
        d.file
    );
    let pdb = Manifest::read("pdb.yaml");
    let allows_one_down = match (
        pdb.find("spec.minAvailable").and_then(Value::as_u64),
        pdb.find("spec.maxUnavailable").and_then(Value::as_u64),
    ) {
        (Some(min), None) => min >= 1 && min < replicas,
        (None, Some(max)) => max >= 1 && max < replicas,
        _ => false,
    };
    assert!(
        allows_one_down,
        "{}: spec.minAvailable or spec.maxUnavailable (one of them, a number) must keep one pod \
         serving and still let one go, with {} spec.replicas {replicas}",
        pdb.file, d.file
    );
}

#[test]
fn the_container_is_hardened() {
    let d = deployment();
    let sc = format!("{CONTAINER}.securityContext");
    let flag = |path: &str| d.find(path).and_then(Value::as_bool);
    assert_eq!(
        flag(&format!("{sc}.runAsNonRoot"))
            .or(flag("spec.template.spec.securityContext.runAsNonRoot")),
        Some(true),
        "{}: {sc}.runAsNonRoot",
        d.file
    );
    assert_eq!(
        flag(&format!("{sc}.readOnlyRootFilesystem")),
        Some(true),
        "{}: {sc}.readOnlyRootFilesystem",
        d.file
    );
    assert_eq!(
        flag(&format!("{sc}.allowPrivilegeEscalation")),
        Some(false),
        "{}: {sc}.allowPrivilegeEscalation",
        d.file
    );
    let drop: Vec<&str> = d
        .find(&format!("{sc}.capabilities.drop"))
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(drop, ["ALL"], "{}: {sc}.capabilities.drop", d.file);
    for r in ["requests.cpu", "requests.memory", "limits.memory"] {
        d.at(&format!("{CONTAINER}.resources.{r}"));
    }
}

// The image -------------------------------------------------------------------

/// The file names the Containerfile's last stage copies into the folder
/// that holds `trellis`, and that folder.
fn image_binaries() -> (String, BTreeSet<String>) {
    let file = "deploy/container/Containerfile";
    let text = std::fs::read_to_string(repo().join(file))
        .unwrap_or_else(|e| panic!("{file}: cannot read it: {e}"));
    // Join continued lines, keep the last stage.
    let joined = text.replace("\\\n", " ");
    let last_stage: Vec<&str> = joined
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .rsplit(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .next()
        .map(<[&str]>::to_vec)
        .unwrap_or_default();
    let mut copied: Vec<PathBuf> = Vec::new();
    for line in &last_stage {
        let Some(rest) = line.strip_prefix("COPY ") else {
            continue;
        };
        let words: Vec<&str> = rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let Some((dest, sources)) = words.split_last() else {
            continue;
        };
        for s in sources {
            let name = Path::new(s).file_name().expect("a file name");
            let to = if dest.ends_with('/') {
                Path::new(dest).join(name)
            } else {
                PathBuf::from(dest)
            };
            copied.push(to);
        }
    }
    let trellis = copied
        .iter()
        .find(|p| p.file_name().is_some_and(|n| n == "trellis"))
        .unwrap_or_else(|| panic!("{file}: the last stage copies no `trellis`"));
    let dir = trellis.parent().expect("a folder").to_path_buf();
    let entry = last_stage
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .unwrap_or_else(|| panic!("{file}: no ENTRYPOINT in the last stage"));
    assert!(
        entry.contains("trellis\""),
        "{file}: ENTRYPOINT {entry} does not run trellis"
    );
    let names = copied
        .iter()
        .filter(|p| p.parent() == Some(dir.as_path()))
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    (dir.display().to_string(), names)
}

#[test]
fn every_pattern_command_is_a_binary_the_image_ships() {
    let (config, _dir, _path) = loaded_config();
    let (dir, shipped) = image_binaries();
    for expected in [
        "trellis-memstore",
        "trellis-redis",
        "trellis-postgres",
        "trellis-nats",
    ] {
        assert!(
            shipped.contains(expected),
            "deploy/container/Containerfile: {expected} is not copied next to trellis in {dir} \
             (found {shipped:?})"
        );
    }
    for (i, p) in config.patterns.iter().enumerate() {
        // A bare name is found next to `trellis`; an absolute path must be
        // one of the copied files.
        let name = match p.command.strip_prefix(&format!("{dir}/")) {
            Some(rest) => rest,
            None => &p.command,
        };
        assert!(
            !name.contains('/') && shipped.contains(name),
            "deploy/kubernetes/configmap.yaml: patterns[{i}].command {:?} is not a binary \
             deploy/container/Containerfile copies next to trellis ({dir}: {shipped:?})",
            p.command
        );
    }
}
