//! Replays the fuzzing corpus through the same checks the fuzz targets run.
//!
//! For each target (see `twinbd::fuzzing` and `fuzz/fuzz_targets/`), every file under
//! `fixtures/fuzz/<target>/` (the minimized corpus) and `fixtures/fuzz/regressions/<target>/`
//! (inputs that once made a target fail) is fed to `twinbd::fuzzing::<target>`, together with
//! the generated seeds; the resource-file target also gets every `fixtures/*.toml` and
//! `fixtures/bad/*.toml`. A panic in any of them fails the test, naming every failing file.
//!
//! `seeds_pass_and_can_be_written` writes the seeds as files to start a fuzzing run from:
//! `TWINBD_FUZZ_SEED_DIR=fuzz/corpus cargo test --test fuzz_corpus seeds_pass` (see
//! `docs/reliability.md`).

use std::any::Any;
use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use twinbd::fuzzing;
use twinbd::storage::IoBuf;

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

/// The peer-frame seeds hold one message of every kind the decoder knows, so a new kind
/// cannot be left out of them unnoticed.
#[test]
fn every_peer_message_kind_has_a_seed() {
    use twinbd::peer::wire::{self, WireError, HEADER_LEN};
    let seeded: BTreeSet<u16> = fuzzing::sample_messages()
        .iter()
        .map(|m| {
            let f = wire::encode(m, 0);
            u16::from_be_bytes([f[4], f[5]])
        })
        .collect();
    for kind in 0..=u16::from(u8::MAX) {
        // An empty frame of this kind with a valid checksum: only an unknown kind says so.
        let mut hb = [0u8; HEADER_LEN];
        hb[0..4].copy_from_slice(&wire::MAGIC.to_be_bytes());
        hb[4..6].copy_from_slice(&kind.to_be_bytes());
        let crc = crc32c::crc32c(&hb[..20]);
        hb[20..24].copy_from_slice(&crc.to_be_bytes());
        let h = wire::decode_header(&hb).expect("header");
        let known = !matches!(
            wire::decode(&h, IoBuf::default()),
            Err(WireError::UnknownKind(_))
        );
        assert_eq!(
            known,
            seeded.contains(&kind),
            "message kind {kind}: add it to fuzzing::sample_messages"
        );
    }
}

/// Every seed passes its target's checks, and the seeds are written out as files: to
/// `$TWINBD_FUZZ_SEED_DIR/<target>/` when set (to start a fuzzing run), else to a temporary
/// folder that is read back and compared.
#[test]
fn seeds_pass_and_can_be_written() {
    let temp = tempfile::tempdir().expect("tempdir");
    let root = std::env::var_os("TWINBD_FUZZ_SEED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| temp.path().to_path_buf());
    for target in fuzzing::TARGETS {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create seed folder");
        for (name, data) in fuzzing::seeds(target) {
            fuzzing::run(target, &data);
            let path = dir.join(format!("seed-{name}"));
            std::fs::write(&path, &data).expect("write seed");
            assert_eq!(std::fs::read(&path).expect("read seed"), data);
        }
        if target == "resource_file" {
            for p in toml_fixtures() {
                let name = p.file_name().expect("file name").to_string_lossy();
                std::fs::copy(&p, dir.join(format!("fixture-{name}"))).expect("copy fixture");
            }
        }
    }
}
