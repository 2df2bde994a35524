//! Whole-config tests: defaults, route choice, sections, and the exact error text of every check.

use super::*;

#[test]
fn embedded_default_is_valid() {
    let c = Config::embedded_default();
    assert_eq!(c.smtp.listen, vec!["127.0.0.1:2525".parse().unwrap()]);
    assert!(c.is_trusted("127.0.0.9".parse().unwrap()));
    assert!(!c.is_trusted("10.0.0.1".parse().unwrap()));
    assert!(c.route_for("example.test").is_some());
    assert!(c.route_for("other.test").is_none());
}

#[test]
fn appliance_default_is_valid_and_relays_nothing() {
    let c = Config::appliance_default("QEMU-0A1B2C3D");
    assert_eq!(c.hostname, "qemu-0a1b2c3d.sealgate.invalid");
    assert_eq!(c.smtp.listen, vec!["0.0.0.0:25".parse().unwrap()]);
    assert!(!c.is_trusted("127.0.0.1".parse().unwrap()));
    assert!(c.route_for("example.test").is_none());
    let odd = Config::appliance_default("a b/c\"d");
    assert_eq!(odd.hostname, "a-b-c-d.sealgate.invalid");
}

#[test]
fn route_specificity() {
    let c = Config::from_toml(
        r#"
        [smtp]
        listen = ["127.0.0.1:25"]
        [[route]]
        domain = "*"
        next_hop = ["127.0.0.2:25"]
        [[route]]
        domain = ".example.com"
        next_hop = ["127.0.0.3:25"]
        [[route]]
        domain = "a.example.com"
        maildir = "/tmp/m"
        "#,
        "t",
    )
    .unwrap();
    let hop = |d: &str| c.route_for(d).map(|r| r.destination.clone());
    assert_eq!(
        hop("a.example.com"),
        Some(Destination::Maildir("/tmp/m".into()))
    );
    assert_eq!(
        hop("b.example.com"),
        Some(Destination::NextHops(vec![("127.0.0.3".into(), 25)]))
    );
    assert_eq!(
        hop("example.com"),
        Some(Destination::NextHops(vec![("127.0.0.2".into(), 25)]))
    );
}

#[test]
fn bad_configs_name_the_key() {
    let cases = [
        ("[smtp]\nlisten = [\"nope\"]", "smtp.listen"),
        (
            "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"10.0.0.0/33\"]",
            "smtp.trusted_networks",
        ),
        ("[smtp]\nlisten = []", "smtp.listen"),
        (
            "[smtp]\nlisten = [\"127.0.0.1:25\"]\n[tls]\nhandshake_timeout = \"soon\"",
            "tls.handshake_timeout",
        ),
        (
            "[smtp]\nlisten = [\"127.0.0.1:25\"]\n[[route]]\ndomain = \"x.test\"\nmx = true\nmaildir = \"m\"",
            "route[0]",
        ),
        (
            "[smtp]\nlisten = [\"127.0.0.1:25\"]\n[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"sometimes\"",
            "route[0].tls",
        ),
        (
            "[smtp]\nlisten = [\"127.0.0.1:25\"]\n[[route]]\ndomain = \"x.test\"\nmx = true\nclient_certificate = \"vpn\"",
            "route[0].client_certificate",
        ),
    ];
    for (text, key) in cases {
        match Config::from_toml(text, "t") {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
            other => panic!("{text}: expected error on {key}, got {other:?}"),
        }
    }
    assert!(matches!(
        Config::from_toml("[smtp]\nlisten = [\"127.0.0.1:25\"]\nbogus = 1", "t"),
        Err(ConfigError::Syntax { .. })
    ));
}

#[test]
fn mgmt_section() {
    let base = "[smtp]\nlisten = [\"127.0.0.1:25\"]\n";
    let c = Config::from_toml(base, "t").unwrap();
    assert_eq!(c.mgmt.listen, None, "board default");
    assert_eq!(c.mgmt.certificate, "default");
    assert!(!c.mgmt.has_credentials());
    let pin = "AB:".repeat(31) + "AB";
    let text = format!(
        "{base}[mgmt]\nlisten = [\"127.0.0.2:8443\"]\ncertificate = \"admin\"\n\
         admin_certificates = [\"{pin}\"]\nadmin_token_sha256 = [\"{}\"]\n",
        "0f".repeat(32)
    );
    let c = Config::from_toml(&text, "t").unwrap();
    assert_eq!(c.mgmt.listen, Some(vec!["127.0.0.2:8443".parse().unwrap()]));
    assert_eq!(c.mgmt.certificate, "admin");
    assert_eq!(c.mgmt.admin_certificates, vec![[0xab; 32]]);
    assert_eq!(c.mgmt.admin_token_sha256, vec![[0x0f; 32]]);
    assert!(c.mgmt.has_credentials());
    let off = Config::from_toml(&format!("{base}[mgmt]\nlisten = []\n"), "t").unwrap();
    assert_eq!(off.mgmt.listen, Some(vec![]));
    for (extra, key) in [
        ("listen = [\"127.0.0.1:25\"]", "mgmt.listen"),
        ("listen = [\"here\"]", "mgmt.listen"),
        ("certificate = \"a/b\"", "mgmt.certificate"),
        ("admin_certificates = [\"abc\"]", "mgmt.admin_certificates"),
        (
            "admin_token_sha256 = [\"secret\"]",
            "mgmt.admin_token_sha256",
        ),
    ] {
        match Config::from_toml(&format!("{base}[mgmt]\n{extra}\n"), "t") {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{extra}"),
            other => panic!("{extra}: expected error on {key}, got {other:?}"),
        }
    }
}

fn ca_pem() -> String {
    rcgen::generate_simple_self_signed(vec!["ca.test".to_string()])
        .expect("cert")
        .cert
        .pem()
}

#[test]
fn vpn_peers_and_cas() {
    let pem = ca_pem();
    let dir = std::env::temp_dir().join(format!("sealgate-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("ca.pem");
    std::fs::write(&file, &pem).unwrap();
    let text = format!(
        r#"
        [smtp]
        listen = ["127.0.0.1:25"]
        [[tls.ca]]
        name = "company-vpn-ca"
        pem = """{pem}"""
        [[tls.ca]]
        name = "other"
        file = "{}"
        [[tls.peers]]
        networks = ["198.51.100.0/24", "127.0.0.7"]
        ca = "company-vpn-ca"
        [[tls.peers]]
        networks = ["10.0.0.0/8"]
        ca = "other"
        "#,
        file.display()
    );
    let c = Config::from_toml(&text, "t").unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(c.tls.cas.len(), 2);
    assert_eq!(c.ca("company-vpn-ca").map(|a| a.certs.len()), Some(1));
    assert_eq!(c.ca("other").map(|a| a.certs.len()), Some(1));
    let peer = |ip: &str| c.peer_for(ip.parse().unwrap()).map(|p| p.ca.as_str());
    assert_eq!(peer("198.51.100.9"), Some("company-vpn-ca"));
    assert_eq!(peer("127.0.0.7"), Some("company-vpn-ca"));
    assert_eq!(peer("10.1.2.3"), Some("other"));
    assert_eq!(peer("127.0.0.8"), None);
}

#[test]
fn bad_vpn_configs_name_the_key() {
    let pem = ca_pem();
    let head = "[smtp]\nlisten = [\"127.0.0.1:25\"]\n";
    let ca = format!("[[tls.ca]]\nname = \"vpn\"\npem = \"\"\"{pem}\"\"\"\n");
    let cases = [
        (
            format!("{head}{ca}[[tls.peers]]\nnetworks = [\"10.0.0.0/8\"]\nca = \"nope\"\n"),
            "tls.peers[0].ca",
        ),
        (
            format!("{head}{ca}[[tls.peers]]\nnetworks = [\"10.0.0.1/8\"]\nca = \"vpn\"\n"),
            "tls.peers[0].networks",
        ),
        (
            format!("{head}{ca}[[tls.peers]]\nnetworks = []\nca = \"vpn\"\n"),
            "tls.peers[0].networks",
        ),
        (
            format!("{head}[[tls.ca]]\nname = \"vpn\"\npem = \"not a pem\"\n"),
            "tls.ca[0].pem",
        ),
        (
            format!(
                "{head}[[tls.ca]]\nname = \"vpn\"\npem = \"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\\n\"\n"
            ),
            "tls.ca[0].pem",
        ),
        (
            format!("{head}[[tls.ca]]\nname = \"vpn\"\nfile = \"/nonexistent/ca.pem\"\n"),
            "tls.ca[0].file",
        ),
        (format!("{head}[[tls.ca]]\nname = \"vpn\"\n"), "tls.ca[0]"),
        (
            format!("{head}[[tls.ca]]\nname = \"bad name\"\npem = \"\"\"{pem}\"\"\"\n"),
            "tls.ca[0].name",
        ),
        (format!("{head}{ca}{ca}"), "tls.ca[1].name"),
    ];
    for (text, key) in cases {
        match Config::from_toml(&text, "t") {
            Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
            other => panic!("{text}: expected error on {key}, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The exact text of every error. It is part of the interface: admins read it, docs/config.md
// and the end-to-end tests quote it. The tables were taken from the config checks as they were
// before the config was split into sections, and the order of the checks is fixed with them:
// where a case has two errors, the one listed is the one reported.

/// A valid `[smtp]` table, for the cases about other sections.
const HEAD: &str = "[smtp]\nlisten = [\"127.0.0.1:25\"]\n";

/// Fills in `{pem}` (a usable CA certificate), `{ca}` (a `[[tls.ca]]` named `vpn`), `{fp}`
/// (a valid fingerprint) and `{many}` (65 of them, as the body of a TOML array).
fn fill(text: &str, pem: &str) -> String {
    let ca = format!("[[tls.ca]]\nname = \"vpn\"\npem = \"\"\"{pem}\"\"\"\n");
    let fp = "ab".repeat(32);
    let many = vec![format!("\"{fp}\""); 65].join(", ");
    text.replace("{ca}", &ca)
        .replace("{pem}", pem)
        .replace("{fp}", &fp)
        .replace("{many}", &many)
}

fn message(text: &str) -> String {
    match Config::from_toml(text, "t") {
        Ok(_) => "accepted".to_string(),
        Err(e) => e.to_string(),
    }
}

/// (whole config, whole error message).
const WHOLE: &[(&str, &str)] = &[
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"0s\"",
        "config key smtp.command_timeout: must be between 1s and 1d",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ndata_timeout = \"500ms\"",
        "config key smtp.data_timeout: must be between 1s and 1d",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_errors = 0",
        "config key smtp.max_errors: must be 1 to 1000",
    ),
    (
        "[device]\nhostname = \"bad host\"\n[smtp]\nlisten = [\"127.0.0.1:25\"]",
        "config key device.hostname: \"bad host\" is not a domain name",
    ),
    (
        "[device]\nhostname = \"\"\n[smtp]\nlisten = [\"127.0.0.1:25\"]",
        "config key device.hostname: \"\" is not a domain name",
    ),
    (
        "[device]\nhostname = \"a..b\"\n[smtp]\nlisten = [\"nope\"]",
        "config key device.hostname: \"a..b\" is not a domain name",
    ),
    (
        "[smtp]\nlisten = [\"nope\"]",
        "config key smtp.listen: \"nope\" is not an IP:port address",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1\"]",
        "config key smtp.listen: \"127.0.0.1\" is not an IP:port address",
    ),
    (
        "[smtp]\nimplicit_tls = [\"127.0.0.1:x\"]",
        "config key smtp.implicit_tls: \"127.0.0.1:x\" is not an IP:port address",
    ),
    (
        "[smtp]\nlisten = []",
        "config key smtp.listen: no listener: give smtp.listen, smtp.implicit_tls or smtp.submission",
    ),
    (
        "",
        "config key smtp.listen: no listener: give smtp.listen, smtp.implicit_tls or smtp.submission",
    ),
    (
        "[smtp]\nimplicit_tls = []\nlisten = []",
        "config key smtp.listen: no listener: give smtp.listen, smtp.implicit_tls or smtp.submission",
    ),
    (
        "[smtp]\nlisten = [\"nope\"]\nimplicit_tls = [\"bad\"]",
        "config key smtp.listen: \"nope\" is not an IP:port address",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nlocal_domains = [\"ok.test\", \"bad domain\"]",
        "config key smtp.local_domains: \"bad domain\" is not a domain name",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"10.0.0.0/33\"]",
        "config key smtp.trusted_networks: \"10.0.0.0/33\": prefix length must be 0..=32 for IPv4, 0..=128 for IPv6",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"10.0.0.1/8\"]",
        "config key smtp.trusted_networks: \"10.0.0.1/8\": host bits set below the prefix (did you mean the network address?)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"nonsense\"]",
        "config key smtp.trusted_networks: \"nonsense\": not an IP address",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"1.2.3.4/x\"]",
        "config key smtp.trusted_networks: \"1.2.3.4/x\": prefix length must be 0..=32 for IPv4, 0..=128 for IPv6",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"::/129\"]",
        "config key smtp.trusted_networks: \"::/129\": prefix length must be 0..=32 for IPv4, 0..=128 for IPv6",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"10.0.0.0 /8\"]",
        "config key smtp.trusted_networks: \"10.0.0.0 /8\": not an IP address",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"2001:db8::1/32\"]",
        "config key smtp.trusted_networks: \"2001:db8::1/32\": host bits set below the prefix (did you mean the network address?)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"10.0.0.0/-1\"]",
        "config key smtp.trusted_networks: \"10.0.0.0/-1\": prefix length must be 0..=32 for IPv4, 0..=128 for IPv6",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_message_bytes = 1023",
        "config key smtp.max_message_bytes: must be between 1024 and 4294967296",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_message_bytes = 4294967297",
        "config key smtp.max_message_bytes: must be between 1024 and 4294967296",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_recipients = 0",
        "config key smtp.max_recipients: must be between 1 and 100000",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_recipients = 100001",
        "config key smtp.max_recipients: must be between 1 and 100000",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_connections = 0",
        "config key smtp.max_connections: must be between 1 and 1000000 (and max_connections_per_ip at least 1)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_connections = 1000001",
        "config key smtp.max_connections: must be between 1 and 1000000 (and max_connections_per_ip at least 1)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_connections_per_ip = 0",
        "config key smtp.max_connections: must be between 1 and 1000000 (and max_connections_per_ip at least 1)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"5x\"",
        "config key smtp.command_timeout: \"5x\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ndata_timeout = \"\"",
        "config key smtp.data_timeout: \"\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"1h30m\"",
        "config key smtp.command_timeout: \"1h30m\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ndata_timeout = \"5M\"",
        "config key smtp.data_timeout: \"5M\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"2 hours\"",
        "config key smtp.command_timeout: \"2 hours\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"1w\"",
        "config key smtp.command_timeout: \"1w\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"1.5s\"",
        "config key smtp.command_timeout: \"1.5s\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"99999999999999999999s\"",
        "config key smtp.command_timeout: \"99999999999999999999s\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"999999999999999999d\"",
        "config key smtp.command_timeout: \"999999999999999999d\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"1us\"",
        "config key smtp.command_timeout: \"1us\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"+5s\"",
        "config key smtp.command_timeout: \"+5s\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nlocal_domains = [\"bad domain\"]\ntrusted_networks = [\"x\"]",
        "config key smtp.local_domains: \"bad domain\" is not a domain name",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ntrusted_networks = [\"x\"]\nmax_message_bytes = 1",
        "config key smtp.trusted_networks: \"x\": not an IP address",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_connections = 0\ncommand_timeout = \"x\"",
        "config key smtp.max_connections: must be between 1 and 1000000 (and max_connections_per_ip at least 1)",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = \"x\"\n[device]\nhostname = \"-ok-\"\n[queue]\nmax_queue_time = \"y\"",
        "config key smtp.command_timeout: \"x\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[smtp]\nimplicit_tls = [\"127.0.0.1:465\"]\n[mgmt]\nlisten = [\"127.0.0.1:465\"]",
        "config key mgmt.listen: 127.0.0.1:465 is also an SMTP listener",
    ),
];

/// (config after [`HEAD`], whole error message).
const AFTER_HEAD: &[(&str, &str)] = &[
    // Every duration, count and size has a documented range; extremes name the key.
    (
        "[queue]\nretry_schedule = [\"18446744073709551615\"]",
        "config key queue.retry_schedule: must be between 1s and 30d",
    ),
    (
        "[queue]\nretry_schedule = [\"1m\", \"0s\"]",
        "config key queue.retry_schedule: must be between 1s and 30d",
    ),
    (
        "[queue]\nmax_queue_time = \"18446744073709551615\"",
        "config key queue.max_queue_time: must be between 0s and 3650d",
    ),
    (
        "[queue]\nmax_deliveries = 0",
        "config key queue.max_deliveries: must be 1 to 4096",
    ),
    (
        "[queue]\nmax_deliveries = 4097",
        "config key queue.max_deliveries: must be 1 to 4096",
    ),
    (
        "[queue]\nmax_connections_per_hop = 0",
        "config key queue.max_connections_per_hop: must be 1 to 1000",
    ),
    (
        "[queue]\nmax_connections_per_hop = 1001",
        "config key queue.max_connections_per_hop: must be 1 to 1000",
    ),
    (
        "[queue]\nconnect_timeout = \"0s\"",
        "config key queue.connect_timeout: must be between 1s and 1d",
    ),
    (
        "[tls]\nhandshake_timeout = \"2d\"",
        "config key tls.handshake_timeout: must be between 1s and 1d",
    ),
    (
        "[tls]\nbroken_tls_ttl = \"366d\"",
        "config key tls.broken_tls_ttl: must be between 0s and 365d",
    ),
    (
        "[tls]\ndowngrade_window = \"3651d\"",
        "config key tls.downgrade_window: must be between 0s and 3650d",
    ),
    (
        "[queue]\nretry_schedule = [\"1m\", \"soon\"]",
        "config key queue.retry_schedule: \"soon\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[queue]\nretry_schedule = []",
        "config key queue.retry_schedule: needs at least one delay",
    ),
    (
        "[queue]\nmax_queue_time = \"forever\"",
        "config key queue.max_queue_time: \"forever\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[queue]\nconnect_timeout = \"-1s\"",
        "config key queue.connect_timeout: \"-1s\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[queue]\nbind_address = \"localhost\"",
        "config key queue.bind_address: \"localhost\" is not an IP address",
    ),
    (
        "[queue]\nbind_address = \"10.0.0.1/32\"",
        "config key queue.bind_address: \"10.0.0.1/32\" is not an IP address",
    ),
    (
        "[queue]\nretry_schedule = []\nmax_queue_time = \"x\"",
        "config key queue.retry_schedule: needs at least one delay",
    ),
    (
        "[queue]\nmax_queue_time = \"x\"\nconnect_timeout = \"y\"",
        "config key queue.max_queue_time: \"x\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[queue]\nconnect_timeout = \"y\"\nbind_address = \"z\"",
        "config key queue.connect_timeout: \"y\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[queue]\nbind_address = \"z\"\n[tls]\ndowngrade = \"x\"",
        "config key queue.bind_address: \"z\" is not an IP address",
    ),
    (
        "[tls]\ndowngrade = \"maybe\"",
        "config key tls.downgrade: \"maybe\": use \"refuse\" or \"allow\"",
    ),
    (
        "[tls]\ndowngrade = \"Refuse\"",
        "config key tls.downgrade: \"Refuse\": use \"refuse\" or \"allow\"",
    ),
    (
        "[tls]\ndowngrade = \"\"",
        "config key tls.downgrade: \"\": use \"refuse\" or \"allow\"",
    ),
    (
        "[tls]\nhandshake_timeout = \"soon\"",
        "config key tls.handshake_timeout: \"soon\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[tls]\nbroken_tls_ttl = \"3 days\"",
        "config key tls.broken_tls_ttl: \"3 days\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[tls]\ndowngrade_window = \"30D\"",
        "config key tls.downgrade_window: \"30D\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[tls]\nmax_peers = 0",
        "config key tls.max_peers: must be 1 to 1000000",
    ),
    (
        "[tls]\nmax_peers = 1000001",
        "config key tls.max_peers: must be 1 to 1000000",
    ),
    (
        "[tls]\nforce = [\"10.0.0.0/8\", \"10.0.0.1/8\"]",
        "config key tls.force: \"10.0.0.1/8\": host bits set below the prefix (did you mean the network address?)",
    ),
    (
        "[tls]\nforce = [\"::1/200\"]",
        "config key tls.force: \"::1/200\": prefix length must be 0..=32 for IPv4, 0..=128 for IPv6",
    ),
    (
        "[tls]\ndowngrade = \"x\"\nhandshake_timeout = \"y\"",
        "config key tls.downgrade: \"x\": use \"refuse\" or \"allow\"",
    ),
    (
        "[tls]\nhandshake_timeout = \"y\"\nbroken_tls_ttl = \"z\"",
        "config key tls.handshake_timeout: \"y\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[tls]\nbroken_tls_ttl = \"z\"\ndowngrade_window = \"w\"",
        "config key tls.broken_tls_ttl: \"z\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[tls]\ndowngrade_window = \"w\"\nmax_peers = 0",
        "config key tls.downgrade_window: \"w\" is not a duration (use e.g. 30s, 5m, 3h, 3d)",
    ),
    (
        "[tls]\nmax_peers = 0\nforce = [\"x\"]",
        "config key tls.max_peers: must be 1 to 1000000",
    ),
    (
        "[tls]\nforce = [\"x\"]\n[dns]\nresolver = [\"y\"]",
        "config key tls.force: \"x\": not an IP address",
    ),
    (
        "[[tls.certificates]]\nname = \"\"",
        "config key tls.certificates[0].name: \"\": use letters, digits, '-' and '_'",
    ),
    (
        "[[tls.certificates]]\nname = \"a b\"",
        "config key tls.certificates[0].name: \"a b\": use letters, digits, '-' and '_'",
    ),
    (
        "[[tls.certificates]]\nname = \"a\"\n[[tls.certificates]]\nname = \"a\"",
        "config key tls.certificates[1].name: \"a\" is listed twice",
    ),
    (
        "[[tls.certificates]]\nname = \"a\"\ncert_file = \"c.pem\"",
        "config key tls.certificates[0]: cert_file and key_file go together",
    ),
    (
        "[[tls.certificates]]\nname = \"a\"\nkey_file = \"k.pem\"",
        "config key tls.certificates[0]: cert_file and key_file go together",
    ),
    (
        "[[tls.certificates]]\nname = \"a\"\nlocal_addresses = [\"1.2.3.4\", \"host\"]",
        "config key tls.certificates[0].local_addresses: \"host\" is not an IP address",
    ),
    (
        "[[tls.certificates]]\nname = \"a\"\nserver_names = [\"ok.test\", \"bad name\"]",
        "config key tls.certificates[0].server_names: \"bad name\" is not a domain name",
    ),
    (
        "[[tls.certificates]]\nname = \"ok\"\n[[tls.certificates]]\nname = \"b/c\"",
        "config key tls.certificates[1].name: \"b/c\": use letters, digits, '-' and '_'",
    ),
    (
        "[[tls.certificates]]\nname = \"a\"\ncert_file = \"c.pem\"\nlocal_addresses = [\"x\"]",
        "config key tls.certificates[0]: cert_file and key_file go together",
    ),
    (
        "[[tls.certificates]]\nname = \"a\"\nlocal_addresses = [\"x\"]\nserver_names = [\"bad name\"]",
        "config key tls.certificates[0].local_addresses: \"x\" is not an IP address",
    ),
    (
        "[tls]\ndowngrade = \"x\"\n[[tls.certificates]]\nname = \"\"",
        "config key tls.downgrade: \"x\": use \"refuse\" or \"allow\"",
    ),
    (
        "[[tls.certificates]]\nname = \"\"\n[[tls.ca]]\nname = \"\"",
        "config key tls.certificates[0].name: \"\": use letters, digits, '-' and '_'",
    ),
    (
        "[[tls.ca]]\nname = \"bad name\"\npem = \"x\"",
        "config key tls.ca[0].name: \"bad name\": use letters, digits, '-' and '_'",
    ),
    (
        "[[tls.ca]]\nname = \"\"\npem = \"x\"",
        "config key tls.ca[0].name: \"\": use letters, digits, '-' and '_'",
    ),
    (
        "[[tls.ca]]\nname = \"v\"",
        "config key tls.ca[0]: give exactly one of pem, file",
    ),
    (
        "[[tls.ca]]\nname = \"v\"\npem = \"\"\"{pem}\"\"\"\nfile = \"/x\"",
        "config key tls.ca[0]: give exactly one of pem, file",
    ),
    (
        "[[tls.ca]]\nname = \"v\"\nfile = \"/nonexistent/ca.pem\"",
        "config key tls.ca[0].file: cannot read /nonexistent/ca.pem: No such file or directory (os error 2)",
    ),
    (
        "[[tls.ca]]\nname = \"v\"\npem = \"not a pem\"",
        "config key tls.ca[0].pem: no CERTIFICATE block",
    ),
    (
        "[[tls.ca]]\nname = \"v\"\npem = \"\"",
        "config key tls.ca[0].pem: no CERTIFICATE block",
    ),
    (
        "[[tls.ca]]\nname = \"v\"\npem = \"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\\n\"",
        "config key tls.ca[0].pem: not a usable X.509 CA certificate",
    ),
    (
        "[[tls.ca]]\nname = \"v\"\npem = \"\"\"{pem}-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\"\"\"",
        "config key tls.ca[0].pem: not a usable X.509 CA certificate",
    ),
    (
        "{ca}{ca}",
        "config key tls.ca[1].name: \"vpn\" is listed twice",
    ),
    (
        "{ca}[[tls.ca]]\nname = \"w\"\npem = \"x\"",
        "config key tls.ca[1].pem: no CERTIFICATE block",
    ),
    (
        "[[tls.ca]]\nname = \"v\"\n[[tls.peers]]\nnetworks = []\nca = \"v\"",
        "config key tls.ca[0]: give exactly one of pem, file",
    ),
    (
        "{ca}[[tls.peers]]\nnetworks = []\nca = \"vpn\"",
        "config key tls.peers[0].networks: is empty",
    ),
    (
        "{ca}[[tls.peers]]\nca = \"vpn\"",
        "config key tls.peers[0].networks: is empty",
    ),
    (
        "{ca}[[tls.peers]]\nnetworks = [\"10.0.0.1/8\"]\nca = \"vpn\"",
        "config key tls.peers[0].networks: \"10.0.0.1/8\": host bits set below the prefix (did you mean the network address?)",
    ),
    (
        "{ca}[[tls.peers]]\nnetworks = [\"10.0.0.0/8\"]\nca = \"nope\"",
        "config key tls.peers[0].ca: \"nope\" is not in tls.ca",
    ),
    (
        "[[tls.peers]]\nnetworks = [\"10.0.0.0/8\"]\nca = \"nope\"",
        "config key tls.peers[0].ca: \"nope\" is not in tls.ca",
    ),
    (
        "{ca}[[tls.peers]]\nnetworks = [\"10.0.0.0/8\"]\nca = \"vpn\"\n[[tls.peers]]\nnetworks = [\"x\"]\nca = \"vpn\"",
        "config key tls.peers[1].networks: \"x\": not an IP address",
    ),
    (
        "{ca}[[tls.peers]]\nnetworks = [\"x\"]\nca = \"nope\"",
        "config key tls.peers[0].networks: \"x\": not an IP address",
    ),
    (
        "[tls]\nhandshake_timeout = \"x\"\n[[tls.peers]]\nnetworks = []\nca = \"v\"",
        "config key tls.peers[0].networks: is empty",
    ),
    (
        "[dns]\nresolver = [\"8.8.8.8:53\", \"dns.example\"]",
        "config key dns.resolver: \"dns.example\" is not an IP[:port]",
    ),
    (
        "[dns]\nresolver = [\"::1:53x\"]",
        "config key dns.resolver: \"::1:53x\" is not an IP[:port]",
    ),
    (
        "[dns]\nresolver = [\"1.2.3.4:99999\"]",
        "config key dns.resolver: \"1.2.3.4:99999\" is not an IP[:port]",
    ),
    (
        "[dns]\nresolver = [\"\"]",
        "config key dns.resolver: \"\" is not an IP[:port]",
    ),
    (
        "[dns]\nresolver = [\"x\"]\n[tls]\nmax_peers = 0",
        "config key tls.max_peers: must be 1 to 1000000",
    ),
    (
        "[mgmt]\nlisten = [\"here\"]",
        "config key mgmt.listen: \"here\" is not an IP:port address",
    ),
    (
        "[mgmt]\nlisten = [\"127.0.0.1:25\"]",
        "config key mgmt.listen: 127.0.0.1:25 is also an SMTP listener",
    ),
    (
        "[mgmt]\nlisten = [\"127.0.0.2:8443\", \"127.0.0.1:25\"]",
        "config key mgmt.listen: 127.0.0.1:25 is also an SMTP listener",
    ),
    (
        "[mgmt]\nlisten = [\"127.0.0.1:25\", \"x\"]",
        "config key mgmt.listen: \"x\" is not an IP:port address",
    ),
    (
        "[mgmt]\ncertificate = \"a/b\"",
        "config key mgmt.certificate: \"a/b\": use letters, digits, '-' and '_'",
    ),
    (
        "[mgmt]\ncertificate = \"\"",
        "config key mgmt.certificate: \"\": use letters, digits, '-' and '_'",
    ),
    (
        "[mgmt]\nadmin_certificates = [\"abc\"]",
        "config key mgmt.admin_certificates: \"abc\" is not a SHA-256 fingerprint (64 hex digits)",
    ),
    (
        "[mgmt]\nadmin_certificates = [{many}]",
        "config key mgmt.admin_certificates: at most 64 fingerprints",
    ),
    (
        "[mgmt]\nadmin_token_sha256 = [\"secret\"]",
        "config key mgmt.admin_token_sha256: \"secret\" is not a SHA-256 fingerprint (64 hex digits)",
    ),
    (
        "[mgmt]\nadmin_token_sha256 = [\"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz\"]",
        "config key mgmt.admin_token_sha256: \"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz\" is not a SHA-256 fingerprint (64 hex digits)",
    ),
    (
        "[mgmt]\nadmin_token_sha256 = [{many}]",
        "config key mgmt.admin_token_sha256: at most 64 fingerprints",
    ),
    (
        "[mgmt]\nlisten = [\"127.0.0.1:25\"]\ncertificate = \"a/b\"",
        "config key mgmt.listen: 127.0.0.1:25 is also an SMTP listener",
    ),
    (
        "[mgmt]\ncertificate = \"a/b\"\nadmin_certificates = [\"x\"]",
        "config key mgmt.certificate: \"a/b\": use letters, digits, '-' and '_'",
    ),
    (
        "[mgmt]\nadmin_certificates = [\"x\"]\nadmin_token_sha256 = [\"y\"]",
        "config key mgmt.admin_certificates: \"x\" is not a SHA-256 fingerprint (64 hex digits)",
    ),
    (
        "[mgmt]\ncertificate = \"a/b\"\n[dns]\nresolver = [\"x\"]",
        "config key dns.resolver: \"x\" is not an IP[:port]",
    ),
    (
        "[mgmt]\ncertificate = \"a/b\"\n[[route]]\ndomain = \"\"\nmx = true",
        "config key mgmt.certificate: \"a/b\": use letters, digits, '-' and '_'",
    ),
    (
        "[[route]]\ndomain = \"\"\nmx = true",
        "config key route[0].domain: \"\" is not a domain name",
    ),
    (
        "[[route]]\ndomain = \".\"\nmx = true",
        "config key route[0].domain: \"\" is not a domain name",
    ),
    (
        "[[route]]\ndomain = \".bad name\"\nmx = true",
        "config key route[0].domain: \"bad name\" is not a domain name",
    ),
    (
        "[[route]]\ndomain = \"**\"\nmx = true",
        "config key route[0].domain: \"**\" is not a domain name",
    ),
    (
        "[[route]]\ndomain = \"..x.test\"\nmx = true",
        "config key route[0].domain: \".x.test\" is not a domain name",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\n[[route]]\ndomain = \"X.test.\"\nmx = true",
        "config key route[1].domain: \"X.test.\" has two routes",
    ),
    (
        "[[route]]\ndomain = \"*\"\nmx = true\n[[route]]\ndomain = \" * \"\nmx = true",
        "config key route[1].domain: \" * \" has two routes",
    ),
    (
        "[[route]]\ndomain = \".x.test\"\nmx = true\n[[route]]\ndomain = \".X.TEST\"\nmx = true",
        "config key route[1].domain: \".X.TEST\" has two routes",
    ),
    (
        "[[route]]\ndomain = \"x.test\"",
        "config key route[0]: give exactly one of next_hop, mx = true, maildir",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = false",
        "config key route[0]: give exactly one of next_hop, mx = true, maildir",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"a:25\"]\nmx = true",
        "config key route[0]: give exactly one of next_hop, mx = true, maildir",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"a:25\"]\nmx = true\nmaildir = \"m\"",
        "config key route[0]: give exactly one of next_hop, mx = true, maildir",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"a:25\"]\nport = 26",
        "config key route[0].port: only with mx = true (next hops carry their own port)",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmaildir = \"m\"\nport = 26",
        "config key route[0].port: only with mx = true (next hops carry their own port)",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = []",
        "config key route[0].next_hop: is empty",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"nohost\"]",
        "config key route[0].next_hop: \"nohost\" is not host:port",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"a:port\"]",
        "config key route[0].next_hop: \"a:port\" is not host:port",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"a:70000\"]",
        "config key route[0].next_hop: \"a:70000\" is not host:port",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"bad host:25\"]",
        "config key route[0].next_hop: \"bad host\" is not a domain name",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"a.test:25\", \":25\"]",
        "config key route[0].next_hop: \"\" is not a domain name",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"sometimes\"",
        "config key route[0].tls: \"sometimes\": use none, may, encrypt, verify, fingerprint, dane or dane-only",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"MAY\"",
        "config key route[0].tls: \"MAY\": use none, may, encrypt, verify, fingerprint, dane or dane-only",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"\"",
        "config key route[0].tls: \"\": use none, may, encrypt, verify, fingerprint, dane or dane-only",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\nca = \"v\"",
        "config key route[0].ca: only with tls = \"verify\"",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"encrypt\"\nca = \"v\"",
        "config key route[0].ca: only with tls = \"verify\"",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"verify\"\nca = \"v\"",
        "config key route[0].ca: \"v\" is not in tls.ca",
    ),
    (
        "{ca}[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"verify\"\nca = \"other\"",
        "config key route[0].ca: \"other\" is not in tls.ca",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"fingerprint\"\nfingerprints = [\"abc\"]",
        "config key route[0].fingerprints: \"abc\" is not a SHA-256 fingerprint (64 hex digits)",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"fingerprint\"\nfingerprints = [{many}]",
        "config key route[0].fingerprints: at most 64 fingerprints",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"fingerprint\"",
        "config key route[0].fingerprints: tls = \"fingerprint\" needs at least one pinned SHA-256 fingerprint",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"fingerprint\"\nfingerprints = []",
        "config key route[0].fingerprints: tls = \"fingerprint\" needs at least one pinned SHA-256 fingerprint",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\nfingerprints = [\"{fp}\"]",
        "config key route[0].fingerprints: only with tls = \"fingerprint\"",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"verify\"\nfingerprints = [\"{fp}\"]",
        "config key route[0].fingerprints: only with tls = \"fingerprint\"",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmaildir = \"m\"\ntls = \"may\"",
        "config key route[0].tls: a maildir route has no TLS settings",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmaildir = \"m\"\ntls = \"none\"",
        "config key route[0].tls: a maildir route has no TLS settings",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmaildir = \"m\"\nclient_certificate = \"a\"",
        "config key route[0].tls: a maildir route has no TLS settings",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmaildir = \"m\"\ntls = \"bad\"",
        "config key route[0].tls: \"bad\": use none, may, encrypt, verify, fingerprint, dane or dane-only",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmaildir = \"m\"\nfingerprints = [\"{fp}\"]",
        "config key route[0].fingerprints: only with tls = \"fingerprint\"",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmaildir = \"m\"\nclient_certificate = \"nope\"",
        "config key route[0].tls: a maildir route has no TLS settings",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\nclient_certificate = \"vpn\"",
        "config key route[0].client_certificate: \"vpn\" is not in tls.certificates",
    ),
    (
        "[[tls.certificates]]\nname = \"vpn\"\n[[route]]\ndomain = \"x.test\"\nmx = true\nclient_certificate = \"other\"",
        "config key route[0].client_certificate: \"other\" is not in tls.certificates",
    ),
    (
        "[[route]]\ndomain = \"a.test\"\nmx = true\n[[route]]\ndomain = \"b.test\"",
        "config key route[1]: give exactly one of next_hop, mx = true, maildir",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"verify\"\nca = \"v\"\nfingerprints = [\"abc\"]",
        "config key route[0].ca: \"v\" is not in tls.ca",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\nfingerprints = [\"abc\"]",
        "config key route[0].fingerprints: \"abc\" is not a SHA-256 fingerprint (64 hex digits)",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"bad\"\nca = \"v\"",
        "config key route[0].tls: \"bad\": use none, may, encrypt, verify, fingerprint, dane or dane-only",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"bad\"]\ntls = \"bad\"",
        "config key route[0].next_hop: \"bad\" is not host:port",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nmx = true\nfingerprints = [\"{fp}\"]\nclient_certificate = \"x\"",
        "config key route[0].fingerprints: only with tls = \"fingerprint\"",
    ),
    (
        "[[route]]\ndomain = \"bad domain\"\nnext_hop = []",
        "config key route[0].domain: \"bad domain\" is not a domain name",
    ),
    (
        "[[route]]\ndomain = \"x.test\"\nnext_hop = [\"a:25\"]\nmaildir = \"m\"\nport = 26",
        "config key route[0]: give exactly one of next_hop, mx = true, maildir",
    ),
];

/// (config after [`HEAD`], start of the message): the rest is the PEM parser's own text.
const AFTER_HEAD_PREFIX: &[(&str, &str)] = &[
    (
        "[[tls.ca]]\nname = \"v\"\npem = \"-----BEGIN CERTIFICATE-----\\n!!!!\\n-----END CERTIFICATE-----\\n\"",
        "config key tls.ca[0].pem: bad PEM: ",
    ),
    (
        "[[tls.ca]]\nname = \"v\"\npem = \"-----BEGIN CERTIFICATE-----\\nAAAA\\n\"",
        "config key tls.ca[0].pem: bad PEM: ",
    ),
];

/// (whole config, last line of the TOML error): shapes stay strings and lists, so that a bad
/// level or duration is a key error with its reason, not a TOML type error.
const SYNTAX: &[(&str, &str)] = &[
    (
        "bogus = 1\n[smtp]\nlisten = [\"127.0.0.1:25\"]",
        "unknown field `bogus`, expected one of `device`, `smtp`, `queue`, `tls`, `dns`, `mgmt`, `auth`, `route`, `recipients`",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nextra = 1",
        "unknown field `extra`, expected one of `listen`, `implicit_tls`, `submission`, `local_domains`, `trusted_networks`, `max_message_bytes`, `max_recipients`, `max_connections`, `max_connections_per_ip`, `max_errors`, `command_timeout`, `data_timeout`",
    ),
    (
        "[smtp]\nlisten = \"127.0.0.1:25\"",
        "invalid type: string \"127.0.0.1:25\", expected a sequence",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nmax_recipients = -1",
        "invalid value: integer `-1`, expected usize",
    ),
    (
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\ncommand_timeout = 30",
        "invalid type: integer `30`, expected a string",
    ),
];

/// As [`SYNTAX`], after [`HEAD`].
const SYNTAX_AFTER_HEAD: &[(&str, &str)] = &[
    (
        "bogus = 1",
        "unknown field `bogus`, expected one of `listen`, `implicit_tls`, `submission`, `local_domains`, `trusted_networks`, `max_message_bytes`, `max_recipients`, `max_connections`, `max_connections_per_ip`, `max_errors`, `command_timeout`, `data_timeout`",
    ),
    (
        "[[route]]\ndomain = \"x\"\ntls = 5",
        "invalid type: integer `5`, expected a string",
    ),
    ("[[route]]\nmx = true", "missing field `domain`"),
    (
        "[[tls.peers]]\nnetworks = [\"10.0.0.0/8\"]",
        "missing field `ca`",
    ),
    (
        "[tls]\ndowngrade = true",
        "invalid type: boolean `true`, expected a string",
    ),
    (
        "[tls]\nmax_peers = -1",
        "invalid value: integer `-1`, expected usize",
    ),
    (
        "[queue]\nretry_schedule = \"1m\"",
        "invalid type: string \"1m\", expected a sequence",
    ),
    (
        "[queue]\nmax_queue_time = 5",
        "invalid type: integer `5`, expected a string",
    ),
    (
        "[dns]\nresolver = \"1.1.1.1\"",
        "invalid type: string \"1.1.1.1\", expected a sequence",
    ),
    (
        "[mgmt]\nadmin_certificates = \"x\"",
        "invalid type: string \"x\", expected a sequence",
    ),
    ("[[tls.ca]]\npem = \"x\"", "missing field `name`"),
    (
        "[[tls.certificates]]\nserver_names = []",
        "missing field `name`",
    ),
    ("not toml", "key with no value, expected `=`"),
];

#[test]
fn error_messages_are_exact() {
    let pem = ca_pem();
    for (text, want) in WHOLE {
        assert_eq!(message(&fill(text, &pem)), *want, "{text}");
    }
    for (text, want) in AFTER_HEAD {
        let text = format!("{HEAD}{}", fill(text, &pem));
        assert_eq!(message(&text), *want, "{text}");
    }
    for (text, want) in AFTER_HEAD_PREFIX {
        let got = message(&format!("{HEAD}{text}"));
        assert!(got.starts_with(want), "{text}: {got}");
    }
}

#[test]
fn syntax_errors_stay_syntax_errors() {
    let cases = SYNTAX.iter().map(|(t, w)| (t.to_string(), *w)).chain(
        SYNTAX_AFTER_HEAD
            .iter()
            .map(|(t, w)| (format!("{HEAD}{t}"), *w)),
    );
    for (text, want) in cases {
        match Config::from_toml(&text, "t") {
            Err(ConfigError::Syntax { path, message }) => {
                assert_eq!(path, "t");
                assert!(message.trim_end().ends_with(want), "{text}: {message}");
            }
            other => panic!("{text}: expected a syntax error, got {other:?}"),
        }
    }
}

/// (field, value as Debug text) for a config of only [`HEAD`]: every default.
#[test]
fn defaults() {
    let c = Config::from_toml(HEAD, "t").unwrap();
    let cases: [(&str, String, &str); 24] = [
        ("hostname", format!("{:?}", c.hostname), "\"localhost\""),
        (
            "max_message_bytes",
            format!("{:?}", c.smtp.max_message_bytes),
            "52428800",
        ),
        (
            "max_recipients",
            format!("{:?}", c.smtp.max_recipients),
            "100",
        ),
        (
            "max_connections",
            format!("{:?}", c.smtp.max_connections),
            "1000",
        ),
        (
            "max_connections_per_ip",
            format!("{:?}", c.smtp.max_connections_per_ip),
            "50",
        ),
        ("max_errors", format!("{:?}", c.smtp.max_errors), "10"),
        (
            "command_timeout",
            format!("{:?}", c.smtp.command_timeout),
            "300s",
        ),
        ("data_timeout", format!("{:?}", c.smtp.data_timeout), "180s"),
        (
            "max_queue_time",
            format!("{:?}", c.queue.max_queue_time),
            "432000s",
        ),
        (
            "retry_schedule",
            format!("{:?}", c.queue.retry_schedule),
            "[60s, 300s, 900s, 1800s, 3600s, 7200s, 14400s]",
        ),
        (
            "min_free_bytes",
            format!("{:?}", c.queue.min_free_bytes),
            "67108864",
        ),
        (
            "max_deliveries",
            format!("{:?}", c.queue.max_deliveries),
            "64",
        ),
        (
            "max_connections_per_hop",
            format!("{:?}", c.queue.max_connections_per_hop),
            "20",
        ),
        (
            "connect_timeout",
            format!("{:?}", c.queue.connect_timeout),
            "30s",
        ),
        (
            "bind_address",
            format!("{:?}", c.queue.bind_address),
            "None",
        ),
        (
            "handshake_timeout",
            format!("{:?}", c.tls.handshake_timeout),
            "30s",
        ),
        (
            "broken_tls_ttl",
            format!("{:?}", c.tls.broken_tls_ttl),
            "259200s",
        ),
        ("downgrade", format!("{:?}", c.tls.downgrade), "Refuse"),
        (
            "downgrade_window",
            format!("{:?}", c.tls.downgrade_window),
            "2592000s",
        ),
        ("max_peers", format!("{:?}", c.tls.max_peers), "10000"),
        (
            "system_roots",
            format!("{:?}", c.tls.system_roots),
            "\"/etc/ssl/certs/ca-certificates.crt\"",
        ),
        ("dns_resolvers", format!("{:?}", c.dns.resolvers), "[]"),
        ("mgmt.listen", format!("{:?}", c.mgmt.listen), "None"),
        (
            "mgmt.certificate",
            format!("{:?}", c.mgmt.certificate),
            "\"default\"",
        ),
    ];
    for (field, got, want) in cases {
        assert_eq!(got, want, "{field}");
    }
}

/// (field, value as Debug text) for a config that sets every key, with values at the edges
/// of their ranges and in the forms that get normalised (case, trailing dots, blanks, `:`).
#[test]
fn every_key_set() {
    let pem = ca_pem();
    let text = format!(
        r#"
        [device]
        hostname = "GW.Example.COM."
        [smtp]
        listen = ["127.0.0.1:2525", "[::1]:2525"]
        implicit_tls = ["0.0.0.0:465"]
        local_domains = ["Example.test", "b.test."]
        trusted_networks = ["127.0.0.0/8", "::1", " 172.16.0.0/12 ", "10.0.0.0/+8"]
        max_message_bytes = 4294967296
        max_recipients = 1
        max_connections = 1000000
        max_connections_per_ip = 1
        max_errors = 1
        command_timeout = " 30 s "
        data_timeout = "1500ms"
        [queue]
        max_queue_time = "3d"
        retry_schedule = ["10", "1", "5m", "1h", "1d", "007s"]
        min_free_bytes = 0
        max_deliveries = 4096
        max_connections_per_hop = 1000
        connect_timeout = "5 m"
        bind_address = "::1"
        [tls]
        handshake_timeout = "2h"
        broken_tls_ttl = "1"
        downgrade = "allow"
        downgrade_window = "0"
        max_peers = 1
        system_roots = "/x/roots.pem"
        force = ["203.0.113.0/24", "2001:db8:1::/48"]
        dev_self_signed = true
        [[tls.certificates]]
        name = "default"
        local_addresses = ["127.0.0.1", "::1"]
        server_names = ["MX.example.test."]
        cert_file = "c.pem"
        key_file = "k.pem"
        [[tls.certificates]]
        name = "vpn_2"
        [[tls.ca]]
        name = "company-vpn-ca"
        pem = """{pem}"""
        [[tls.peers]]
        networks = ["198.51.100.0/24", "127.0.0.7"]
        ca = "company-vpn-ca"
        [dns]
        resolver = ["1.1.1.1", "[::1]:5353"]
        [mgmt]
        listen = ["127.0.0.1:8443"]
        certificate = "vpn_2"
        [[route]]
        domain = "*"
        mx = true
        [[route]]
        domain = ".Example.COM"
        mx = true
        port = 2525
        tls = "verify"
        ca = "company-vpn-ca"
        client_certificate = "vpn_2"
        [[route]]
        domain = "a.example.com"
        next_hop = ["127.0.0.3:25", "::1:27", "Relay.Example.NET.:2525", "[relay.test]:25"]
        tls = "fingerprint"
        fingerprints = ["{fp}"]
        [[route]]
        domain = " local.test "
        maildir = "/var/mail/x"
        "#,
        fp = vec!["2C"; 32].join(":"),
    );
    let c = Config::from_toml(&text, "t").unwrap();
    let route = |d: &str| {
        c.route_for(d)
            .map(|r| format!("{:?} {:?} {:?} {:?}", r.domain, r.destination, r.tls, r.ca))
            .unwrap_or_default()
    };
    let cases = [
        (
            "hostname",
            format!("{:?}", c.hostname),
            "\"gw.example.com\"",
        ),
        (
            "listen",
            format!("{:?}", c.smtp.listen),
            "[127.0.0.1:2525, [::1]:2525]",
        ),
        (
            "local_domains",
            format!("{:?}", c.smtp.local_domains),
            "[\"example.test\", \"b.test\"]",
        ),
        (
            "trusted_networks",
            c.smtp
                .trusted_networks
                .iter()
                .map(|n| n.to_string() + " ")
                .collect(),
            "127.0.0.0/8 ::1/128 172.16.0.0/12 10.0.0.0/8 ",
        ),
        (
            "max_message_bytes",
            format!("{:?}", c.smtp.max_message_bytes),
            "4294967296",
        ),
        ("max_errors", format!("{:?}", c.smtp.max_errors), "1"),
        (
            "command_timeout",
            format!("{:?}", c.smtp.command_timeout),
            "30s",
        ),
        ("data_timeout", format!("{:?}", c.smtp.data_timeout), "1.5s"),
        (
            "max_queue_time",
            format!("{:?}", c.queue.max_queue_time),
            "259200s",
        ),
        (
            "retry_schedule",
            format!("{:?}", c.queue.retry_schedule),
            "[10s, 1s, 300s, 3600s, 86400s, 7s]",
        ),
        (
            "max_deliveries",
            format!("{:?}", c.queue.max_deliveries),
            "4096",
        ),
        (
            "max_connections_per_hop",
            format!("{:?}", c.queue.max_connections_per_hop),
            "1000",
        ),
        (
            "connect_timeout",
            format!("{:?}", c.queue.connect_timeout),
            "300s",
        ),
        (
            "bind_address",
            format!("{:?}", c.queue.bind_address),
            "Some(::1)",
        ),
        (
            "handshake_timeout",
            format!("{:?}", c.tls.handshake_timeout),
            "7200s",
        ),
        (
            "broken_tls_ttl",
            format!("{:?}", c.tls.broken_tls_ttl),
            "1s",
        ),
        ("downgrade", format!("{:?}", c.tls.downgrade), "Allow"),
        (
            "downgrade_window",
            format!("{:?}", c.tls.downgrade_window),
            "0ns",
        ),
        ("max_peers", format!("{:?}", c.tls.max_peers), "1"),
        (
            "forced 203.0.113.9",
            format!("{:?}", c.is_forced_tls("203.0.113.9".parse().unwrap())),
            "true",
        ),
        (
            "forced 2001:db8:2::1",
            format!("{:?}", c.is_forced_tls("2001:db8:2::1".parse().unwrap())),
            "false",
        ),
        (
            "certificates",
            format!(
                "{:?}",
                c.tls
                    .certificates
                    .iter()
                    .map(|x| (&x.name, &x.local_addresses, &x.server_names))
                    .collect::<Vec<_>>()
            ),
            "[(\"default\", [127.0.0.1, ::1], [\"mx.example.test\"]), (\"vpn_2\", [], [])]",
        ),
        (
            "peer of 127.0.0.7",
            format!(
                "{:?}",
                c.peer_for("127.0.0.7".parse().unwrap()).map(|p| &p.ca)
            ),
            "Some(\"company-vpn-ca\")",
        ),
        (
            "dns_resolvers",
            format!("{:?}", c.dns.resolvers),
            "[1.1.1.1:53, [::1]:5353]",
        ),
        (
            "mgmt",
            format!("{:?} {:?}", c.mgmt.listen, c.mgmt.certificate),
            "Some([127.0.0.1:8443]) \"vpn_2\"",
        ),
        (
            "route other.test",
            route("other.test"),
            "Any Mx(25) May None",
        ),
        (
            "route b.example.com",
            route("b.example.com"),
            "Subdomains(\"example.com\") Mx(2525) Verify Some(\"company-vpn-ca\")",
        ),
        (
            "route a.example.com",
            route("a.example.com"),
            "Exact(\"a.example.com\") NextHops([(\"127.0.0.3\", 25), (\"::1\", 27), (\"relay.example.net\", 2525), (\"relay.test\", 25)]) Fingerprint None",
        ),
        (
            "route local.test",
            route("local.test"),
            "Exact(\"local.test\") Maildir(\"/var/mail/x\") May None",
        ),
        (
            "fingerprints",
            format!(
                "{:?}",
                c.route_for("a.example.com").map(|r| r.fingerprints.clone())
            ),
            &format!("Some([{:?}])", "2c".repeat(32)),
        ),
    ];
    for (field, got, want) in cases {
        assert_eq!(got, want, "{field}");
    }
}

/// (level as written, level read).
#[test]
fn levels_by_name() {
    let cases = [
        (None, TlsLevel::May),
        (Some("none"), TlsLevel::None),
        (Some("may"), TlsLevel::May),
        (Some("encrypt"), TlsLevel::Encrypt),
        (Some("verify"), TlsLevel::Verify),
        (Some("fingerprint"), TlsLevel::Fingerprint),
    ];
    for (written, want) in cases {
        let tls = written
            .map(|l| format!("tls = \"{l}\"\n"))
            .unwrap_or_default();
        let fp = if want == TlsLevel::Fingerprint {
            format!("fingerprints = [\"{}\"]\n", "00".repeat(32))
        } else {
            String::new()
        };
        let text = format!("{HEAD}[[route]]\ndomain = \"x.test\"\nmx = true\n{tls}{fp}");
        let c = Config::from_toml(&text, "t").unwrap();
        assert_eq!(c.routes[0].tls, want, "{written:?}");
    }
    for (written, want) in [("refuse", Downgrade::Refuse), ("allow", Downgrade::Allow)] {
        let text = format!("{HEAD}[tls]\ndowngrade = \"{written}\"\n");
        assert_eq!(
            Config::from_toml(&text, "t").unwrap().tls.downgrade,
            want,
            "{written}"
        );
    }
}

// ---- [auth] ---------------------------------------------------------------------------------

/// `[[auth.backend]]` pieces for the AUTH cases: `{pem}` is a usable CA.
fn auth_config(backend: &str, extra: &str) -> String {
    let pem = ca_pem();
    format!(
        "[smtp]\nlisten = [\"127.0.0.1:25\"]\nsubmission = [\"127.0.0.1:587\"]\n{extra}\n\
         [[tls.ca]]\nname = \"corp\"\npem = \"\"\"{pem}\"\"\"\n[[auth.backend]]\n{backend}\n"
    )
}

#[test]
fn auth_backends_are_typed() {
    let text = auth_config(
        "name = \"dir\"\nkind = \"ldap\"\nurl = \"ldap://dc1.corp.example\"\nstarttls = true\n\
         ca = \"corp\"\nbind_dn = \"uid={user},ou=people,dc=corp\"\ndomains = [\"Corp.Example\"]\n\
         [[auth.backend]]\nname = \"mail\"\nkind = \"imap\"\nurl = \"imaps://[::1]\"\n\
         tls_name = \"mail.b.example\"\nlogin = \"{user}\"\ndomains = [\"b.example\"]\ntimeout = \"3s\"",
        "[auth]\nsender_must_match = \"domain\"\ncache_ttl = \"0s\"\nlockout_after = 3",
    );
    let c = Config::from_toml(&text, "t").unwrap();
    assert_eq!(c.smtp.submission, vec!["127.0.0.1:587".parse().unwrap()]);
    let a = &c.auth;
    assert_eq!(a.sender_binding, SenderBinding::Domain);
    assert_eq!((a.cache_ttl, a.lockout_after), (Duration::ZERO, 3));
    let dir = a.backend_for("corp.example").unwrap();
    assert_eq!(
        (dir.kind, dir.tls),
        (BackendKind::Ldap, BackendTls::StartTls)
    );
    assert_eq!((dir.host.as_str(), dir.port), ("dc1.corp.example", 389));
    assert_eq!(dir.tls_name, "dc1.corp.example");
    assert_eq!(dir.login, "{address}");
    let mail = a.backend_for("b.example").unwrap();
    assert_eq!((mail.tls, mail.port), (BackendTls::Implicit, 993));
    assert_eq!(
        (mail.host.as_str(), mail.tls_name.as_str()),
        ("::1", "mail.b.example")
    );
    assert_eq!(mail.timeout, Duration::from_secs(3));
    assert!(a.backend_for("other.example").is_none());
    // Defaults: no sender binding, 5 minutes of cache, AUTH not on port 25.
    let plain = auth_config(
        "name = \"p\"\nkind = \"pop3\"\nurl = \"pop3s://mail.x:1995/\"\ndomains = [\"x\"]",
        "",
    );
    let c = Config::from_toml(&plain, "t").unwrap();
    assert_eq!(c.auth.sender_binding, SenderBinding::Off);
    assert_eq!(c.auth.cache_ttl, Duration::from_secs(300));
    assert!(!c.auth.on_listen);
    assert_eq!(c.auth.backends.first().map(|b| b.port), Some(1995));
}

#[test]
fn bad_auth_configs_name_the_key_and_the_reason() {
    let ok = "name = \"d\"\nkind = \"smtp\"\nurl = \"smtps://m.x\"\ndomains = [\"x\"]";
    let cases = [
        (
            auth_config(
                "name = \"d\"\nkind = \"ldap\"\nurl = \"ldap://dc\"\nbind_dn = \"uid={user}\"\ndomains = [\"x\"]",
                "",
            ),
            "auth.backend[0].url",
            "ldap:// without starttls = true would send passwords in plaintext",
        ),
        (
            auth_config(
                "name = \"d\"\nkind = \"imap\"\nurl = \"imaps://m\"\nstarttls = true\ndomains = [\"x\"]",
                "",
            ),
            "auth.backend[0].url",
            "imaps:// is TLS already",
        ),
        (
            auth_config(
                "name = \"d\"\nkind = \"pop3\"\nurl = \"imaps://m\"\ndomains = [\"x\"]",
                "",
            ),
            "auth.backend[0].url",
            "takes pop3s:// or pop3://",
        ),
        (
            auth_config(
                "name = \"d\"\nkind = \"ldap\"\nurl = \"ldaps://dc\"\ndomains = [\"x\"]",
                "",
            ),
            "auth.backend[0].bind_dn",
            "needs a DN template",
        ),
        (
            auth_config(
                "name = \"d\"\nkind = \"ldap\"\nurl = \"ldaps://dc\"\nbind_dn = \"uid={name}\"\ndomains = [\"x\"]",
                "",
            ),
            "auth.backend[0].bind_dn",
            "{name}",
        ),
        (
            auth_config(
                "name = \"d\"\nkind = \"imap\"\nurl = \"imaps://m\"\nbind_dn = \"x\"\ndomains = [\"x\"]",
                "",
            ),
            "auth.backend[0].bind_dn",
            "only for kind = \"ldap\"",
        ),
        (
            auth_config(
                "name = \"d\"\nkind = \"imap\"\nurl = \"imaps://m\"\ndomains = []",
                "",
            ),
            "auth.backend[0].domains",
            "name the login domains",
        ),
        (
            auth_config(
                &format!("{ok}\n[[auth.backend]]\n{}", ok.replace("\"d\"", "\"e\"")),
                "",
            ),
            "auth.backend[1].domains",
            "listed twice",
        ),
        (
            auth_config(&format!("{ok}\nca = \"nope\""), ""),
            "auth.backend[0].ca",
            "no [[tls.ca]] named \"nope\"",
        ),
        (
            auth_config(
                "name = \"d\"\nkind = \"kerberos\"\nurl = \"x://m\"\ndomains = [\"x\"]",
                "",
            ),
            "auth.backend[0].kind",
            "use ldap, imap, pop3 or smtp",
        ),
        (
            auth_config(
                "name = \"d\"\nkind = \"smtp\"\nurl = \"smtps://u@m.x/path\"\ndomains = [\"x\"]",
                "",
            ),
            "auth.backend[0].url",
            "only scheme://host[:port]",
        ),
        (
            auth_config(ok, "[auth]\nsender_must_match = \"yes\""),
            "auth.sender_must_match",
            "use true, false",
        ),
        (
            auth_config(ok, "[auth]\nfail_delay = \"5s\"\nmax_fail_delay = \"1s\""),
            "auth.max_fail_delay",
            "must not be shorter",
        ),
        (
            auth_config(ok, "[auth]\nlockout_after = 0"),
            "auth.lockout_after",
            "must be 1 to 1000",
        ),
        (
            format!("{HEAD}submission = [\"127.0.0.1:587\"]\n"),
            "smtp.submission",
            "needs at least one [[auth.backend]]",
        ),
    ];
    for (text, key, reason) in cases {
        match Config::from_toml(&text, "t") {
            Err(ConfigError::Invalid { key: k, reason: r }) => {
                assert_eq!(k, key, "{text}");
                assert!(r.contains(reason), "{key}: {r:?} lacks {reason:?}");
            }
            other => panic!("{text}: expected error on {key}, got {other:?}"),
        }
    }
}

/// An ldap backend `dir` (CA `corp`) and a `[[recipients]]` table using it, with `extra` lines.
fn recipients_config(backend_extra: &str, extra: &str) -> String {
    auth_config(
        &format!(
            "name = \"dir\"\nkind = \"ldap\"\nurl = \"ldaps://dc.corp\"\nca = \"corp\"\n{backend_extra}"
        ),
        &format!(
            "local_domains = [\"corp.example\"]\n[[recipients]]\ndomain = \"corp.example\"\nbackend = \"dir\"\n{extra}"
        ),
    )
}

#[test]
fn recipients_and_search_then_bind_are_typed() {
    let text = recipients_config(
        "search_base = \"ou=people,dc=corp\"\nsearch_filter = \"(uid={user})\"\n\
         service_dn = \"cn=gw,dc=corp\"\nservice_password = { secret = \"gw\" }\n\
         domains = [\"corp.example\"]",
        "search_base = \"dc=corp\"\nfilter = \"(|(mail={address})(proxyAddresses=smtp:{address}))\"\n\
         service_dn = \"cn=gw,dc=corp\"\nservice_password = { secret = \"gw\" }\n\
         on_unavailable = \"accept\"\nnegative_ttl = \"30s\"",
    );
    let c = Config::from_toml(&text, "t").unwrap();
    let dir = c.auth.backend_for("corp.example").unwrap();
    assert_eq!(dir.bind_dn, None);
    let s = dir.search.as_ref().unwrap();
    assert_eq!(
        (s.base.as_str(), s.filter.as_str()),
        ("ou=people,dc=corp", "(uid={user})")
    );
    assert_eq!(
        s.service.as_ref().map(|a| a.password.name.as_str()),
        Some("gw")
    );
    let r = c.recipient_check("corp.example").unwrap();
    assert!(r.accept_when_unavailable);
    assert_eq!(
        (r.positive_ttl, r.negative_ttl),
        (Duration::from_secs(600), Duration::from_secs(30))
    );
    assert_eq!(r.max_cached, 10_000);
    let refs: Vec<&str> = c.secret_refs().iter().map(|r| r.key.as_str()).collect();
    assert_eq!(
        refs,
        [
            "auth.backend[0].service_password",
            "recipients[0].service_password"
        ]
    );
    // a directory only for recipients: no login domains, anonymous search, default filter
    let text = recipients_config("bind_dn = \"uid={user}\"", "search_base = \"dc=corp\"");
    let c = Config::from_toml(&text, "t").unwrap();
    let r = c.recipient_check("corp.example").unwrap();
    assert_eq!(r.search.filter, "(mail={address})");
    assert!(r.search.service.is_none() && !r.accept_when_unavailable);
    assert!(c.secret_refs().is_empty());
}

#[test]
fn bad_recipient_configs_name_the_key_and_the_reason() {
    let dn = "bind_dn = \"uid={user}\"";
    let cases = [
        (
            recipients_config(dn, "search_base = \"dc=c\"\nfilter = \"mail={address}\""),
            "recipients[0].filter",
            "in parentheses",
        ),
        (
            recipients_config(
                dn,
                "search_base = \"dc=c\"\nfilter = \"(mail={address})(x=1)\"",
            ),
            "recipients[0].filter",
            "in parentheses",
        ),
        (
            recipients_config(dn, "search_base = \"dc=c\"\nfilter = \"(mail={mailbox})\""),
            "recipients[0].filter",
            "{mailbox}",
        ),
        (
            recipients_config(dn, "search_base = \"dc=c\"\nservice_dn = \"cn=gw\""),
            "recipients[0].service_password",
            "needs service_password",
        ),
        (
            recipients_config(
                dn,
                "search_base = \"dc=c\"\nservice_dn = \"cn=gw\"\nservice_password = { secret = \"a b\" }",
            ),
            "recipients[0].service_password",
            "secret name",
        ),
        (
            recipients_config(dn, "search_base = \"dc=c\"\non_unavailable = \"bounce\""),
            "recipients[0].on_unavailable",
            "tempfail",
        ),
        (
            recipients_config(dn, "search_base = \"dc=c\"\nbackend = \"x\""),
            "",
            "",
        ),
        (
            recipients_config(dn, "search_base = \"dc=c\"\npositive_ttl = \"3d\""),
            "recipients[0].positive_ttl",
            "",
        ),
        (
            recipients_config(dn, "search_base = \"dc=c\"").replace(
                "local_domains = [\"corp.example\"]",
                "local_domains = [\"x.example\"]",
            ),
            "recipients[0].domain",
            "not in smtp.local_domains",
        ),
        (
            recipients_config(
                &format!("{dn}\ndomains = [\"corp.example\"]"),
                "search_base = \"dc=c\"",
            )
            .replace("backend = \"dir\"", "backend = \"nope\""),
            "recipients[0].backend",
            "no [[auth.backend]] named \"nope\"",
        ),
        (
            recipients_config(
                "bind_dn = \"uid={user}\"\nsearch_base = \"dc=c\"",
                "search_base = \"dc=c\"",
            ),
            "auth.backend[0].search_base",
            "not both",
        ),
        (
            recipients_config(
                "bind_dn = \"uid={user}\"\nservice_dn = \"cn=gw\"",
                "search_base = \"dc=c\"",
            ),
            "auth.backend[0].search_filter",
            "belong to search-then-bind",
        ),
    ];
    for (text, key, reason) in cases {
        if key.is_empty() {
            // a duplicate key is TOML's to refuse
            assert!(matches!(
                Config::from_toml(&text, "t"),
                Err(ConfigError::Syntax { .. })
            ));
            continue;
        }
        match Config::from_toml(&text, "t") {
            Err(ConfigError::Invalid { key: k, reason: r }) => {
                assert_eq!(k, key, "{text}");
                assert!(r.contains(reason), "{key}: {r:?} lacks {reason:?}");
            }
            other => panic!("{text}: expected error on {key}, got {other:?}"),
        }
    }
}

// ---- [dns] and DANE ---------------------------------------------------------------------------

/// A root key-signing key in the form `ldns-keygen` writes (`.key` file, with its comment).
const ROOT_KSK: &str = ".\tIN\tDNSKEY\t257 3 13 0u115QRuPVwnv1PyaclNmHWYoWju3QbZAKJnEM5opsymxCcixP34wbM35c7X84nxjiY/dQnwyBhbrO8oaCyOKg== ;{id = 4802 (ksk), size = 256b}\n";

#[test]
fn dnssec_and_the_dane_levels() {
    let route =
        |level: &str| format!("[[route]]\ndomain = \"x.test\"\nmx = true\ntls = \"{level}\"\n");
    let dns = format!("[dns]\ndnssec = true\ntrust_anchor = \"\"\"{ROOT_KSK}\"\"\"\n");
    for (level, want) in [("dane", TlsLevel::Dane), ("dane-only", TlsLevel::DaneOnly)] {
        let c = Config::from_toml(&format!("{HEAD}{dns}{}", route(level)), "t").unwrap();
        assert_eq!(c.routes[0].tls, want);
        assert!(c.dns.dnssec);
        assert_eq!(c.dns.trust_anchor.as_deref(), Some(ROOT_KSK));
    }
    // dnssec without an anchor: the IANA root keys (the resolver's built-in ones)
    let c = Config::from_toml(
        &format!("{HEAD}[dns]\ndnssec = true\n{}", route("dane")),
        "t",
    );
    assert!(c.unwrap().dns.trust_anchor.is_none());
    let cases = [
        (route("dane"), "route[0].tls", "dnssec = true"),
        (route("dane-only"), "route[0].tls", "dnssec = true"),
        (
            format!("[dns]\ntrust_anchor = \"\"\"{ROOT_KSK}\"\"\"\n"),
            "dns.trust_anchor",
            "only with dnssec = true",
        ),
        (
            "[dns]\ndnssec = true\ntrust_anchor = \"not a record\"\n".into(),
            "dns.trust_anchor",
            "zone-file form",
        ),
        (
            "[dns]\ndnssec = true\ntrust_anchor = \"\"\n".into(),
            "dns.trust_anchor",
            "no DNSKEY record of the root zone",
        ),
    ];
    for (extra, key, needle) in cases {
        let text = format!("{HEAD}{extra}");
        match Config::from_toml(&text, "t") {
            Err(ConfigError::Invalid { key: k, reason }) => {
                assert_eq!(k, key, "{text}");
                assert!(reason.contains(needle), "{text}: {reason}");
            }
            other => panic!("{text}: expected error on {key}, got {other:?}"),
        }
    }
}
