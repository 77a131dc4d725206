//! Replays the fuzzing corpus through the same checks the fuzz targets run.
//!
//! For each target (see `twinbd::fuzzing` and `fuzz/fuzz_targets/`), every file under
//! `fixtures/fuzz/<target>/` (the minimized corpus) and `fixtures/fuzz/regressions/<target>/`
//! (inputs that once made a target fail) is fed to `twinbd::fuzzing::<target>`, together with
//! the generated seeds; the resource-file target also gets every `fixtures/*.toml` and
//! `fixtures/bad/*.toml`. A panic in any of them fails the test, naming every failing file.
//!
//! The ignored test `write_seeds` writes the seeds as files, to start a fuzzing run from:
//! `TWINBD_FUZZ_SEED_DIR=fuzz/corpus cargo test --test fuzz_corpus -- --ignored write_seeds`
//! (see `docs/reliability.md`).

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use twinbd::fuzzing;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The regular files in `dir`, sorted; none if `dir` does not exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// The resource-file fixtures: every `fixtures/*.toml` and `fixtures/bad/*.toml`.
fn toml_fixtures() -> Vec<PathBuf> {
    let mut v = files_in(&fixtures());
    v.extend(files_in(&fixtures().join("bad")));
    v.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    v
}

fn panic_message(e: Box<dyn Any + Send>) -> String {
    if let Some(s) = e.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Runs `target` on every input; collects the failures instead of stopping at the first.
fn replay(target: &str) {
    let corpus = fixtures().join("fuzz").join(target);
    let corpus_files = files_in(&corpus);
    assert!(
        !corpus_files.is_empty(),
        "no corpus for {target} in {}",
        corpus.display()
    );
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    let regressions = fixtures().join("fuzz").join("regressions").join(target);
    let mut paths = corpus_files;
    paths.extend(files_in(&regressions));
    if target == "resource_file" {
        paths.extend(toml_fixtures());
    }
    for p in paths {
        let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        inputs.push((p.display().to_string(), data));
    }
    for (name, data) in fuzzing::seeds(target) {
        inputs.push((format!("seed {name}"), data));
    }
    let mut failures = Vec::new();
    for (name, data) in &inputs {
        let res = panic::catch_unwind(AssertUnwindSafe(|| fuzzing::run(target, data)));
        if let Err(e) = res {
            failures.push(format!("{name}: {}", panic_message(e)));
        }
    }
    assert!(
        failures.is_empty(),
        "{target}: {} of {} inputs failed:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

#[test]
fn nbd_negotiation_corpus() {
    replay("nbd_negotiation");
}

#[test]
fn nbd_request_corpus() {
    replay("nbd_request");
}

#[test]
fn peer_frame_corpus() {
    replay("peer_frame");
}

#[test]
fn metadata_corpus() {
    replay("metadata");
}

#[test]
fn resource_file_corpus() {
    replay("resource_file");
}

#[test]
fn every_target_has_a_corpus_folder() {
    for target in fuzzing::TARGETS {
        let dir = fixtures().join("fuzz").join(target);
        assert!(dir.is_dir(), "missing {}", dir.display());
    }
}

/// Writes the seeds of every target to `$TWINBD_FUZZ_SEED_DIR/<target>/`.
#[test]
#[ignore = "writes files; run by hand to seed a fuzzing run"]
fn write_seeds() {
    let root =
        PathBuf::from(std::env::var_os("TWINBD_FUZZ_SEED_DIR").expect("set TWINBD_FUZZ_SEED_DIR"));
    for target in fuzzing::TARGETS {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create seed folder");
        for (name, data) in fuzzing::seeds(target) {
            std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
        }
        if target == "resource_file" {
            for p in toml_fixtures() {
                let name = p.file_name().expect("file name").to_string_lossy();
                std::fs::copy(&p, dir.join(format!("fixture-{name}"))).expect("copy fixture");
            }
        }
    }
}
