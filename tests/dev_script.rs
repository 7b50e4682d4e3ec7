//! scripts/dev's process handling, exercised by sourcing it (which only defines its
//! functions) in bash: a zombie counts as exited (`kill -0` still sees one), `stop`
//! stops the gateway that `serve` recorded, leaves a process that is not a gateway
//! alone, and kills a gateway that ignores SIGTERM after the grace.

use std::process::Command;

/// Runs `script` in bash after sourcing scripts/dev, in a scratch directory of its own;
/// returns whether it succeeded, and its stdout and stderr.
fn with_dev_functions(name: &str, script: &str) -> (bool, String) {
    let dev = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/dev");
    let scratch =
        std::env::temp_dir().join(format!("flashgate-dev-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -uo pipefail\nsource '{dev}'\nset +e\ncd '{}'\n{script}",
            scratch.display()
        ))
        .output()
        .expect("bash runs");
    let _ = std::fs::remove_dir_all(&scratch);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn a_zombie_counts_as_gone() {
    let (ok, out) = with_dev_functions(
        "zombie",
        r#"
        # The exec'd sleep never reaps its child: after 0.2 s that child is a zombie.
        bash -c 'sleep 0.2 & echo $! > zpid; exec sleep 10' >/dev/null 2>&1 &
        parent=$!
        sleep 1
        z=$(cat zpid)
        [[ "$(cut -d' ' -f3 /proc/$z/stat)" == Z ]] || { echo "not a zombie"; exit 1; }
        kill -0 "$z" || { echo "kill -0 does not see it"; exit 1; }
        pid_gone "$z" || { echo "pid_gone: a zombie is not gone"; exit 1; }
        start=$SECONDS
        wait_gone "$z" 30 || { echo "wait_gone timed out"; exit 1; }
        (( SECONDS - start <= 1 )) || { echo "wait_gone waited on a zombie"; exit 1; }
        pid_gone 4194999 || { echo "pid_gone: no such pid"; exit 1; }
        pid_gone $$ && { echo "pid_gone: this shell is gone?"; exit 1; }
        kill "$parent"
        echo fine
        "#,
    );
    assert!(ok && out.contains("fine"), "{out}");
}

#[test]
fn stop_stops_the_gateway_serve_recorded_and_nothing_else() {
    let (ok, out) = with_dev_functions(
        "stop",
        r#"
        GATEWAY_PIDFILE="$PWD/gateway.pid"
        # A stand-in gateway: the pid file checks the command name.
        cp "$(command -v sleep)" flashgate
        ./flashgate 60 >/dev/null 2>&1 &
        g=$!
        # Until the fork has become `flashgate` (on a busy machine that takes a while).
        for _ in $(seq 100); do
          [[ "$(cat "/proc/$g/comm" 2>/dev/null)" == flashgate ]] && break
          sleep 0.02
        done
        echo "$g" > "$GATEWAY_PIDFILE"
        stop_gateway || { echo "stop_gateway failed"; exit 1; }
        sleep 0.2
        pid_gone "$g" || { echo "the gateway still runs"; exit 1; }
        [[ ! -e "$GATEWAY_PIDFILE" ]] || { echo "pid file left"; exit 1; }
        stop_gateway || { echo "a second stop failed"; exit 1; }

        # A stale pid file naming another program: left alone.
        sleep 60 >/dev/null 2>&1 &
        other=$!
        echo "$other" > "$GATEWAY_PIDFILE"
        stop_gateway || { echo "stale pid file: failed"; exit 1; }
        pid_gone "$other" && { echo "killed a process that is not a gateway"; exit 1; }
        kill "$other"

        # A gateway that ignores SIGTERM: killed after the grace (+5 s).
        # (#!/bin/bash, not env: the command name is then the script's.)
        printf '#!/bin/bash\ntrap "" TERM\nwhile :; do sleep 0.1; done\n' > flashgate-stubborn
        chmod +x flashgate-stubborn
        ./flashgate-stubborn >/dev/null 2>&1 &
        s=$!
        trap 'kill -9 "$s" 2>/dev/null' EXIT
        sleep 0.3
        echo "$s" > "$GATEWAY_PIDFILE"
        start=$SECONDS
        FLASHGATE_SHUTDOWN_GRACE_SECONDS=0 stop_gateway || { echo "stubborn: failed"; exit 1; }
        pid_gone "$s" || { echo "stubborn gateway survived"; exit 1; }
        (( SECONDS - start < 15 )) || { echo "took too long"; exit 1; }
        echo fine
        "#,
    );
    assert!(ok && out.contains("fine"), "{out}");
    assert!(out.contains("gateway: stopped"), "{out}");
    assert!(out.contains("killing it"), "{out}");
}
