//! The deployment files in `config/` are the ones that work: the systemd units pass
//! `systemd-analyze verify`, and the command line they start runs the real server with the
//! committed `config/server.toml`. (`config/nginx-stowix.conf` is exercised by every test that
//! starts a `Balancer`, tests/replicas.rs and tests/backends_harness.rs.)

mod common;

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const UNITS: [&str; 2] = ["stowix.service", "stowix@.service"];

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// The unit with the binary this test built in place of /usr/local/bin/stowix.
fn unit_text(name: &str) -> String {
    fs::read_to_string(config_dir().join(name))
        .unwrap_or_else(|e| panic!("read config/{name}: {e}"))
        .replace(
            "/usr/local/bin/stowix",
            common::stowix_bin().to_str().unwrap(),
        )
}

#[test]
fn systemd_units_verify_clean() {
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is not installed: run scripts/install-prerequisites.sh (Debian's systemd)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for name in UNITS {
        // A template is verified through one of its instances.
        let file = name.replace("@.", "@8381.");
        let path = dir.path().join(&file);
        fs::write(&path, unit_text(name)).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // It exits 0 on directives it ignores: any message is a finding.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );

    // And it does notice a broken unit, so the check above can fail.
    let broken = dir.path().join("broken.service");
    fs::write(
        &broken,
        unit_text("stowix.service").replace("Type=exec", "Type=sometimes"),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&broken)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "systemd-analyze verify accepted Type=sometimes"
    );
}

/// `ExecStart=` of a unit, split into words (the units quote nothing).
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("unit has ExecStart=");
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
fn the_units_command_line_starts_the_server_with_the_committed_config() {
    for name in UNITS {
        let unit = unit_text(name);
        let dir = tempfile::tempdir().unwrap();
        // What the unit would run, with the template's config file and a free loopback port.
        let args: Vec<String> = exec_start(&unit)
            .into_iter()
            .map(|a| match a.as_str() {
                "/etc/stowix/server.toml" => config_dir().join("server.toml").display().to_string(),
                a if a.starts_with("0.0.0.0:") || a.starts_with("127.0.0.1:") => {
                    "127.0.0.1:0".to_string()
                }
                a => a.to_string(),
            })
            .collect();
        assert_eq!(&args[0], common::stowix_bin().to_str().unwrap(), "{name}");
        // The unit's Environment=STOWIX_DATA_DIR, pointed at a temporary directory.
        assert!(unit.contains("Environment=STOWIX_DATA_DIR="), "{name}");
        let mut child = Command::new(&args[0])
            .args(&args[1..])
            .env("STOWIX_DATA_DIR", dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the unit's command");
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        assert!(
            line.starts_with("listening on http://127.0.0.1:"),
            "{name}: `{}` printed {line:?}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            dir.path().join("stowix.db").exists(),
            "{name}: no database in STOWIX_DATA_DIR"
        );
    }
}
