//! kcat (Debian's build links librdkafka 2.0.2, an old client): metadata, produce with keys
//! and headers, consume back exactly.

use std::io::Write;
use std::process::{Command, Stdio};

use strom_tests::StromProcess;

fn kcat(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("kcat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kcat is installed (scripts/test.sh installs it)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kcat {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn kcat_metadata_produce_consume() {
    let s = StromProcess::start(&[]);
    let b = s.bootstrap();
    let meta = kcat(&["-b", &b, "-L", "-m", "10"], None);
    assert!(meta.contains("broker 1 at 127.0.0.1"), "{meta}");
    let input: String = (0..500).map(|i| format!("key{i}:value {i}\n")).collect();
    kcat(
        &[
            "-b",
            &b,
            "-P",
            "-t",
            "kc",
            "-K:",
            "-H",
            "origin=kcat",
            "-H",
            "n=1",
            "-X",
            "topic.request.required.acks=-1",
        ],
        Some(&input),
    );
    let out = kcat(
        &[
            "-b",
            &b,
            "-C",
            "-t",
            "kc",
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%k|%s|%h|%o\n",
        ],
        None,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 500, "{out}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("key{i}|value {i}|origin=kcat,n=1|{i}"));
    }
    let meta = kcat(&["-b", &b, "-L", "-t", "kc"], None);
    assert!(meta.contains("topic \"kc\" with 1 partitions"), "{meta}");
    // Consume from an offset.
    let out = kcat(
        &[
            "-b", &b, "-C", "-t", "kc", "-o", "495", "-e", "-q", "-f", "%s\n",
        ],
        None,
    );
    assert_eq!(out.lines().count(), 5);
    assert_eq!(out.lines().next(), Some("value 495"));
}
