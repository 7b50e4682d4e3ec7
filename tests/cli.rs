//! The `flashgate` binary as an operator runs it: `reconcile` (its JSON document, its
//! table, its exit codes and messages) and the colour of its logs. Against the Redis and
//! MariaDB that `scripts/dev test` starts (FLASHGATE_REDIS_URL, FLASHGATE_DATABASE_URL);
//! every reconcile names one SKU of its own: a whole pass over a shared test database
//! takes minutes and finds what other tests left on purpose.

mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flashgate");

/// The binary with the test servers' URLs and no colour preference of the caller's.
fn flashgate(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("FLASHGATE_REDIS_URL", common::redis_url())
        .env("FLASHGATE_DATABASE_URL", common::database_url())
        .env_remove("NO_COLOR")
        .env_remove("FLASHGATE_LOG_FORMAT")
        .stdin(Stdio::null());
    command
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(command: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("flashgate runs");
    Run {
        code: status.code().expect("exited, not killed"),
        stdout: String::from_utf8(stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(stderr).expect("utf-8 stderr"),
    }
}

async fn reconcile(args: &[&str]) -> Run {
    let mut command = flashgate(&[&["reconcile"], args].concat());
    tokio::task::spawn_blocking(move || run(&mut command))
        .await
        .unwrap()
}

fn document(run: &Run) -> Value {
    assert_eq!(
        run.stdout.lines().count(),
        1,
        "one JSON document on one line: {:?}",
        run.stdout
    );
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {:?}", run.stdout))
}

async fn sku_on_sale(app: &common::TestApp, prefix: &str) -> String {
    let sku = common::unique_sku(prefix);
    app.create_sku(
        &sku,
        json!({"stock": 5, "per_user_limit": 1, "hold_seconds": 60}),
    )
    .await;
    sku
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_json_is_the_contract_document() {
    let app = common::spawn_app().await;
    let sku = sku_on_sale(&app, "cli-json").await;
    app.hold(&sku, "cli-user").await;

    let clean = reconcile(&["--json", "--sku", &sku]).await;
    assert_eq!(clean.code, 0, "{}", clean.stderr);
    assert_eq!(
        document(&clean),
        json!({"checked": 1, "findings": [], "repaired": 0, "needs_attention": 0})
    );

    // Redis loses the SKU: drift, not repaired without --repair.
    app.lose_sale(&sku).await;
    let found = reconcile(&["--json", "--sku", &sku]).await;
    assert_eq!(found.code, 1, "{}", found.stderr);
    let report = document(&found);
    assert_eq!(report["checked"], 1);
    assert_eq!(report["repaired"], 0);
    assert_eq!(report["needs_attention"], 1);
    let finding = &report["findings"][0];
    assert_eq!(finding["sku"], sku.as_str());
    assert_eq!(finding["kind"], "redis_state_missing");
    assert_eq!(finding["repaired"], false);
    assert!(finding["detail"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(finding["before"].is_string(), "{finding}");
    assert_eq!(finding["after"], Value::Null);
    assert!(
        !found.stderr.contains(&sku),
        "findings are printed once, not logged too: {}",
        found.stderr
    );

    let repaired = reconcile(&["--json", "--repair", "--sku", &sku]).await;
    assert_eq!(repaired.code, 1, "drift found, even when repaired");
    let report = document(&repaired);
    assert_eq!(report["repaired"], 1, "{report}");
    assert_eq!(report["needs_attention"], 0, "{report}");
    assert_eq!(report["findings"][0]["repaired"], true);
    assert!(report["findings"][0]["after"].is_string(), "{report}");

    let again = reconcile(&["--json", "--sku", &sku]).await;
    assert_eq!(again.code, 0, "{}", again.stdout);
    assert_eq!(document(&again)["findings"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_text_has_a_header_and_no_colour_in_a_pipe() {
    let app = common::spawn_app().await;
    let sku = sku_on_sale(&app, "cli-text").await;
    let clean = reconcile(&["--sku", &sku]).await;
    assert_eq!(clean.code, 0, "{}", clean.stderr);
    assert_eq!(clean.stdout, "checked 1 SKU: no drift\n");

    app.lose_sale(&sku).await;
    let found = reconcile(&["--sku", &sku]).await;
    assert_eq!(found.code, 1, "{}", found.stderr);
    let lines: Vec<&str> = found.stdout.lines().collect();
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        ["SKU", "KIND", "RESULT", "DETAIL"],
        "{}",
        found.stdout
    );
    assert!(lines[1].starts_with(&sku), "{}", found.stdout);
    assert!(lines[1].contains("redis_state_missing"), "{}", found.stdout);
    assert!(lines[1].contains("not repaired"), "{}", found.stdout);
    assert!(
        lines[2].trim_start().starts_with("before: "),
        "{}",
        found.stdout
    );
    assert_eq!(
        lines.last().copied(),
        Some("checked 1 SKU: 1 finding, 0 repaired, 1 need attention")
    );
    assert_eq!(found.stdout.matches(sku.as_str()).count(), 1);
    assert!(!found.stdout.contains('\t'));
    assert!(!found.stderr.contains(&sku), "{}", found.stderr);
    for text in [&found.stdout, &found.stderr] {
        assert!(!text.contains('\x1b'), "{text:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_of_an_unknown_sku_exits_2() {
    let sku = common::unique_sku("cli-nosuch");
    for json in [false, true] {
        let mut args = vec!["--sku", sku.as_str()];
        if json {
            args.push("--json");
        }
        let run = reconcile(&args).await;
        assert_eq!(run.code, 2, "{} {}", run.stdout, run.stderr);
        assert!(run.stderr.contains("no such SKU"), "{}", run.stderr);
        assert!(run.stderr.contains(&sku), "{}", run.stderr);
        assert_eq!(run.stdout, "", "nothing on stdout when it could not run");
    }
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[test]
fn an_unreachable_server_is_named_without_its_password() {
    let port = closed_port();
    let redis = format!("redis://:hunter2-secret@127.0.0.1:{port}/0");
    let down = run(flashgate(&["reconcile", "--json"]).env("FLASHGATE_REDIS_URL", &redis));
    assert_eq!(down.code, 2, "{}", down.stderr);
    assert!(
        down.stderr
            .contains(&format!("Redis at redis://:***@127.0.0.1:{port}/0")),
        "{}",
        down.stderr
    );
    assert!(!down.stderr.contains("hunter2"), "{}", down.stderr);
    assert!(!down.stderr.contains("not_applied"), "{}", down.stderr);
    assert_eq!(down.stdout, "");

    let mysql = format!("mysql://root:hunter2-secret@127.0.0.1:{port}/flashgate");
    let down = run(flashgate(&["reconcile"]).env("FLASHGATE_DATABASE_URL", &mysql));
    assert_eq!(down.code, 2, "{}", down.stderr);
    assert!(
        down.stderr.contains(&format!(
            "MySQL at mysql://root:***@127.0.0.1:{port}/flashgate"
        )),
        "{}",
        down.stderr
    );
    assert!(down.stderr.contains("refused"), "{}", down.stderr);
    assert!(!down.stderr.contains("hunter2"), "{}", down.stderr);
}

/// Starts `command` (a `flashgate serve`, or `script` running one) and reads its logs
/// from stderr (or stdout, for `script`, which copies the terminal there) until the
/// "flashgate serving" line; then kills it. Returns the logs read.
fn logs_until_serving(mut command: Command, logs_on_stdout: bool) -> String {
    command
        .env("FLASHGATE_LISTEN", "127.0.0.1:0")
        .env("FLASHGATE_NO_WORKER", "1")
        .env("FLASHGATE_JWT_SECRET", "s".repeat(32))
        .env("FLASHGATE_SERVICE_TOKEN", "t".repeat(32))
        .env("FLASHGATE_ID_KEY", "i".repeat(32))
        .env("FLASHGATE_LOG", "info");
    if logs_on_stdout {
        command.stdout(Stdio::piped()).stderr(Stdio::null());
    } else {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
    }
    let mut child = command.spawn().expect("starts");
    let stream: Box<dyn std::io::Read + Send> = if logs_on_stdout {
        Box::new(child.stdout.take().unwrap())
    } else {
        Box::new(child.stderr.take().unwrap())
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !seen.contains("flashgate serving") {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // Killing `script` closes the terminal: the gateway gets SIGHUP and ends too.
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.contains("flashgate serving"), "{seen}");
    seen
}

#[test]
fn logs_to_a_pipe_carry_no_colour() {
    let logs = logs_until_serving(flashgate(&["serve"]), false);
    assert!(logs.contains("INFO"), "{logs:?}");
    assert!(!logs.contains('\x1b'), "{logs:?}");
}

/// On a terminal the text logs are coloured, unless NO_COLOR has a value. `script`
/// (util-linux) gives the binary a pseudo-terminal; skipped where it is missing.
#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` command for a pseudo-terminal");
        return;
    }
    let under_terminal = |no_color: Option<&str>| {
        let mut command = Command::new("script");
        command
            .args(["-qefc", &format!("{BIN} serve"), "/dev/null"])
            .env("FLASHGATE_REDIS_URL", common::redis_url())
            .env("FLASHGATE_DATABASE_URL", common::database_url())
            .env_remove("FLASHGATE_LOG_FORMAT")
            .stdin(Stdio::null());
        match no_color {
            Some(value) => command.env("NO_COLOR", value),
            None => command.env_remove("NO_COLOR"),
        };
        logs_until_serving(command, true)
    };
    let coloured = under_terminal(None);
    assert!(coloured.contains('\x1b'), "{coloured:?}");
    let plain = under_terminal(Some("1"));
    assert!(!plain.contains('\x1b'), "{plain:?}");
    let empty = under_terminal(Some(""));
    assert!(
        empty.contains('\x1b'),
        "an empty NO_COLOR counts as unset: {empty:?}"
    );
}

/// The `VARIABLE=value` lines of packaging/flashgate.env (what systemd passes).
fn environment_file() -> Vec<(String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/flashgate.env");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let (name, value) = line.split_once('=').unwrap_or_else(|| panic!("{line}"));
            (name.to_string(), value.to_string())
        })
        .collect()
}

/// Every FLASHGATE_* variable the binary reads (an `env = "..."` of src/config.rs, and
/// the log filter) is in the environment file, set or commented out with its default.
#[test]
fn the_environment_file_names_every_setting() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = std::fs::read_to_string(root.join("src/config.rs")).unwrap();
    let file = std::fs::read_to_string(root.join("packaging/flashgate.env")).unwrap();
    let mut read: Vec<&str> = config
        .split("env = \"")
        .skip(1)
        .map(|rest| &rest[..rest.find('"').unwrap()])
        .collect();
    read.push("FLASHGATE_LOG");
    assert!(read.len() > 40, "{read:?}");
    let missing: Vec<&&str> = read
        .iter()
        .filter(|name| !file.contains(&format!("{name}=")))
        .collect();
    assert!(
        missing.is_empty(),
        "not in packaging/flashgate.env: {missing:?}"
    );
}

/// The environment file as shipped parses for every command: with its secrets filled
/// in the gateway starts; reconcile and worker take its lines.
#[test]
fn the_environment_file_works_for_every_command() {
    let with_file = |args: &[&str]| {
        let mut command = flashgate(args);
        command.env_clear();
        for (name, value) in environment_file() {
            command.env(name, value);
        }
        command
            .env("FLASHGATE_REDIS_URL", common::redis_url())
            .env("FLASHGATE_DATABASE_URL", common::database_url());
        command
    };
    // As shipped (secrets empty) the gateway refuses to start, and says why.
    let refused = run(&mut with_file(&["serve"]));
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("FLASHGATE_"), "{}", refused.stderr);
    assert!(
        !refused.stderr.contains("invalid value"),
        "{}",
        refused.stderr
    );
    // Filled in: it serves (logs_until_serving sets the secrets and a free port).
    let logs = logs_until_serving(with_file(&["serve"]), false);
    assert!(!logs.contains('\x1b'), "{logs:?}");
    let sku = common::unique_sku("cli-envfile");
    let unknown = run(&mut with_file(&["reconcile", "--json", "--sku", &sku]));
    assert_eq!(unknown.code, 2, "{}", unknown.stderr);
    assert!(unknown.stderr.contains("no such SKU"), "{}", unknown.stderr);
    // The worker parses it and runs (Redis down: it retries, it does not exit).
    let mut worker = with_file(&["worker"])
        .env(
            "FLASHGATE_REDIS_URL",
            format!("redis://127.0.0.1:{}", closed_port()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let exited = worker.try_wait().unwrap();
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(exited.is_none(), "the worker exited at once: {exited:?}");
}

/// `--version` names the build profile (what flashgate-bench reads); `-V` the version.
#[test]
fn the_version_names_the_build_profile() {
    let long = run(&mut flashgate(&["--version"]));
    assert_eq!(long.code, 0);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    assert_eq!(
        long.stdout.trim(),
        format!("flashgate {} ({profile} build)", env!("CARGO_PKG_VERSION"))
    );
    let short = run(&mut flashgate(&["-V"]));
    assert_eq!(
        short.stdout.trim(),
        format!("flashgate {}", env!("CARGO_PKG_VERSION"))
    );
}
