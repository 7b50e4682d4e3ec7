// The migrations and Lua scripts are embedded in the binary: rebuild when they change.
// FLASHGATE_BUILD (the commit, for `GET /healthz`): FLASHGATE_BUILD_COMMIT when set
// (a package build without .git), else `git rev-parse`, else `unknown`.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=lua");
    println!("cargo:rerun-if-env-changed=FLASHGATE_BUILD_COMMIT");
    let from_git = || {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        let commit = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        (out.status.success() && !commit.is_empty()).then_some(commit)
    };
    let build = std::env::var("FLASHGATE_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(from_git)
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FLASHGATE_BUILD={build}");
    // A new commit is a new build: watch where HEAD points.
    if let Ok(head) = std::fs::read_to_string(".git/HEAD") {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Some(reference) = head.strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed=.git/{}", reference.trim());
        }
    }
}
