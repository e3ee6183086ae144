//! The note documents are Automerge's own format: the JavaScript package
//! (`@automerge/automerge`, which a web client would use) reads a note khub
//! wrote, and khub merges the changes it makes. Needs Node.js and
//! `npm ci --prefix tests/js`; skipped without them unless
//! `KHUB_REQUIRE_JS=1` (as in CI), which turns the skip into a failure.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use khub::ids::DeviceId;
use khub::notes::NoteEdit;
use khub::notes::doc::{NoteDoc, NoteId};

#[test]
fn the_javascript_automerge_package_reads_a_note_and_its_edit_merges_back() {
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    let installed = js.join("node_modules/@automerge/automerge").exists();
    let node = Command::new("node").arg("--version").output().is_ok();
    if !(installed && node) {
        assert!(
            std::env::var_os("KHUB_REQUIRE_JS").is_none(),
            "KHUB_REQUIRE_JS is set but Node.js or tests/js/node_modules is missing: run `npm ci --prefix tests/js`"
        );
        eprintln!("skipped: needs Node.js and `npm ci --prefix tests/js`");
        return;
    }
    let dir = std::env::temp_dir().join(format!("khub-notes-js-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let me = DeviceId::from_slice(&[1; 16]).unwrap();
    let mut doc = NoteDoc::create(
        me,
        &NoteEdit {
            title: Some("Groceries".into()),
            body: Some("milk\neggs\n".into()),
            tags: Some(vec!["home".into(), "food".into()]),
        },
        1_764_680_000_000,
    )
    .unwrap();
    let input = dir.join("note.automerge");
    let output = dir.join("js.changes");
    let snapshot = dir.join("js.snapshot");
    std::fs::write(&input, doc.save()).unwrap();

    let mut child = Command::new("node")
        .arg(js.join("interop.mjs"))
        .arg(&input)
        .arg(&output)
        .arg(&snapshot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "node did not finish in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let result = child.wait_with_output().unwrap();
    assert!(
        result.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(
        seen,
        serde_json::json!({
            "title": "Groceries",
            "body": "milk\neggs\n",
            "tags": ["food", "home"],
            "created": 1_764_680_000_000_i64,
            "deleted": false,
        })
    );

    let raw: Vec<Vec<u8>> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|line| hex::decode(line).unwrap())
        .collect();
    assert_eq!(raw.len(), 1);
    // What a JavaScript client sends passes the checks every device applies.
    khub::notes::wire::check_change(&raw[0]).expect("an uncompressed change chunk");
    let js_snapshot = std::fs::read(&snapshot).unwrap();
    khub::notes::wire::check_document(&js_snapshot).expect("a document without compressed columns");
    let changes: Vec<automerge::Change> = raw
        .into_iter()
        .map(|bytes| automerge::Change::from_bytes(bytes).unwrap())
        .collect();
    doc.apply(changes).unwrap();
    let mut from_snapshot = NoteDoc::empty(DeviceId::from_slice(&[2; 16]).unwrap());
    from_snapshot.merge_saved(&js_snapshot).unwrap();
    assert_eq!(
        from_snapshot.view(NoteId([0; 16])).body,
        "from js: milk\neggs\n"
    );
    let note = doc.view(NoteId([0; 16]));
    assert_eq!(note.body, "from js: milk\neggs\n");
    assert_eq!(note.tags, ["food", "home", "js"]);
    let _ = std::fs::remove_dir_all(&dir);
}
