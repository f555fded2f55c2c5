//! The dataset module: sources, answer parsing, the arithmetic generator, the data cursor.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use rewards::{MathConfig, MathReward, Reward, Sample};
use rollout_server::dataset::{
    CursorState, DataCursor, Dataset, DatasetError, DatasetSpec, Gsm8kError, Problem, SkipReason,
    MAX_ARITHMETIC_LEVEL,
};

fn math() -> MathReward {
    MathReward::new(MathConfig::default()).expect("default math config")
}

fn score(reward: &MathReward, completion: &str, reference: &str) -> f64 {
    reward
        .score(&Sample::new(completion, reference))
        .expect("scorable")
        .value
}

fn write_jsonl(dir: &Path, name: &str, lines: &[&str]) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).expect("create");
    for l in lines {
        writeln!(f, "{l}").expect("write");
    }
    path
}

fn arithmetic(level: u8, count: usize, seed: u64) -> Dataset {
    Dataset::open(&DatasetSpec::Arithmetic { level, count, seed }).expect("generated")
}

#[test]
fn worked_solutions_give_the_final_answer_and_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(
        dir.path(),
        "train.jsonl",
        &[
            r##"{"question": "How many?", "answer": "600 + 634 = 1234\n#### 1,234"}"##,
            r#"{"question": "And now?", "answer": 42, "id": "q-2"}"#,
            r#"{"question": "Cost?", "answer": "$18."}"#,
            r##"{"question": "Half?", "answer": "first #### 3\nthen\n#### 0.5"}"##,
        ],
    );
    let ds = Dataset::open(&DatasetSpec::jsonl(&path)).unwrap();
    let p = ds.problems();
    assert_eq!(p.len(), 4);
    assert_eq!(p[0].answer, "1234");
    assert_eq!(
        p[0].solution.as_deref(),
        Some("600 + 634 = 1234\n#### 1,234")
    );
    assert_eq!(p[0].id, "train-1", "no id field: named after file and line");
    assert_eq!((p[1].answer.as_str(), p[1].id.as_str()), ("42", "q-2"));
    assert_eq!(p[1].solution, None);
    assert_eq!(p[2].answer, "18");
    assert_eq!(p[3].answer, "0.5", "the last `####` counts");
    assert_eq!(ds.stats().loaded, 4);
    assert!(ds.stats().skipped.is_empty());
}

#[test]
fn the_real_gsm8k_problems_load_and_their_solutions_score_one() {
    let ds = Dataset::open(&"gsm8k".parse().unwrap())
        .unwrap_or_else(|e| panic!("{e} (fetch the assets with `tools/fetch-assets.sh gsm8k`)"));
    assert_eq!(ds.len(), 100);
    assert!(ds.stats().skipped.is_empty());
    let ids: HashSet<&str> = ds.problems().iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids.len(), 100, "ids are unique");
    assert!(ids.contains("gsm8k-0000") && ids.contains("gsm8k-0099"));
    let reward = math();
    let dir = protocol::assets::gsm8k_dir();
    for p in ds.problems() {
        // Each problem against its file as written.
        let file = dir.join(format!("{}.toml", &p.id["gsm8k-".len()..]));
        let raw: toml::Table = toml::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let question = raw["question"].as_str().unwrap();
        let solution = raw["answer"].as_str().unwrap();
        let final_answer = solution[solution.rfind("####").unwrap() + 4..].trim();
        assert!(!p.answer.is_empty() && !p.question.is_empty(), "{}", p.id);
        assert_eq!(p.question, question.trim());
        assert!(
            reward.answers_match(&p.answer, final_answer),
            "{}: {} vs {final_answer:?}",
            p.id,
            p.answer,
        );
        let solution = p.solution.as_deref().expect("GSM8K has worked solutions");
        assert_eq!(score(&reward, solution, &p.answer), 1.0, "{}", p.id);
        // The reference is the answer itself, not something the solution happens to contain.
        let wrong = format!("#### {}", p.answer.parse::<f64>().unwrap() + 1.0);
        assert_eq!(score(&reward, &wrong, &p.answer), 0.0, "{}", p.id);
    }
}

#[test]
fn missing_gsm8k_problems_say_how_to_fetch_them() {
    let dir = tempfile::tempdir().unwrap();
    let open = |d: &Path| {
        Dataset::open(&DatasetSpec::Gsm8k {
            dir: Some(d.to_path_buf()),
        })
    };
    for d in [dir.path().join("absent"), dir.path().to_path_buf()] {
        let e = open(&d).expect_err("no problems");
        assert!(
            matches!(&e, DatasetError::Gsm8k(Gsm8kError::Missing(m)) if *m == d),
            "{e:?}"
        );
        assert!(e.to_string().contains("tools/fetch-assets.sh gsm8k"), "{e}");
    }
    std::fs::write(dir.path().join("0000.toml"), "question = 1").unwrap();
    let e = open(dir.path()).expect_err("not a problem");
    assert!(
        matches!(&e, DatasetError::Gsm8k(Gsm8kError::Parse { path, .. }) if path.ends_with("0000.toml")),
        "{e:?}"
    );
    // A problem without a final answer is skipped, the others load.
    std::fs::write(
        dir.path().join("0000.toml"),
        "question = \"1 + 1?\"\nanswer = \"1 + 1 = 2\\n#### 2\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("0001.toml"),
        "question = \"2 + 2?\"\nanswer = \"2 + 2 =\\n####\"\n",
    )
    .unwrap();
    let ds = open(dir.path()).unwrap();
    assert_eq!(ds.problems()[0].id, "gsm8k-0000");
    assert_eq!(ds.problems()[0].answer, "2");
    assert_eq!(ds.stats().skipped.len(), 1);
    assert_eq!(ds.stats().skipped[0].reason, SkipReason::NoFinalAnswer);
    assert_eq!(ds.stats().skipped[0].line, 2);
}

#[test]
fn generated_answers_are_checked_by_the_math_reward() {
    let reward = math();
    for level in 1..=MAX_ARITHMETIC_LEVEL {
        let ds = arithmetic(level, 200, 17);
        assert_eq!(ds.len(), 200);
        for p in ds.problems() {
            let n: u64 = p.answer.parse().unwrap_or_else(|_| {
                panic!("{}: {:?} is not a non-negative integer", p.id, p.answer)
            });
            let solution = p.solution.as_deref().expect("a worked solution");
            assert!(solution.ends_with(&format!("#### {n}")), "{solution}");
            assert_eq!(score(&reward, solution, &p.answer), 1.0, "{}", p.id);
            assert_eq!(score(&reward, &format!("#### {}", n + 1), &p.answer), 0.0);
            // The solution's last step states the answer it computes.
            let last_step = solution.lines().rev().nth(1).unwrap();
            assert!(last_step.ends_with(&format!("= {n}.")), "{last_step}");
        }
    }
}

#[test]
fn level_one_and_two_answers_recomputed_from_the_question() {
    let numbers = |q: &str| -> Vec<u64> {
        q.split(|c: char| !c.is_ascii_digit())
            .filter_map(|s| s.parse().ok())
            .collect()
    };
    for p in arithmetic(1, 300, 3).problems() {
        let n = numbers(&p.question);
        assert_eq!(n.len(), 2, "{}", p.question);
        assert_eq!(p.answer, (n[0] + n[1]).to_string(), "{}", p.question);
    }
    for p in arithmetic(2, 300, 3).problems() {
        let n = numbers(&p.question);
        assert_eq!(n.len(), 2, "{}", p.question);
        let (a, b) = (n[0], n[1]);
        let q = &p.question;
        let want = if q.contains("left?") || q.contains("still in") || q.contains("more") {
            a - b
        } else if q.contains("equally") || q.contains(" into ") {
            assert_eq!(a % b, 0, "{q}");
            a / b
        } else {
            a * b
        };
        assert_eq!(p.answer, want.to_string(), "{q}");
    }
}

#[test]
fn generation_is_seeded_and_varied() {
    for level in 1..=MAX_ARITHMETIC_LEVEL {
        let a = arithmetic(level, 300, 5).into_problems();
        let b = arithmetic(level, 300, 5).into_problems();
        let c = arithmetic(level, 300, 6).into_problems();
        assert_eq!(a, b, "level {level}: same seed, same problems");
        let same = a
            .iter()
            .zip(&c)
            .filter(|(x, y)| x.question == y.question)
            .count();
        assert!(
            same < 10,
            "level {level}: seeds 5 and 6 share {same} questions"
        );
        let distinct: HashSet<&str> = a.iter().map(|p| p.question.as_str()).collect();
        assert!(
            distinct.len() * 10 > 300 * 9,
            "level {level}: {} distinct",
            distinct.len()
        );
        // The wording varies, not only the numbers (every template's use is checked in the
        // generator's unit tests).
        let questions = |ps: &[Problem]| -> HashSet<String> {
            ps.iter()
                .map(|p| {
                    p.question
                        .replace(|c: char| c.is_ascii_digit() || c == ',', "")
                })
                .collect()
        };
        assert!(questions(&a).len() > 100, "level {level}");
        let ids: HashSet<&str> = a.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), 300);
    }
    // A longer run starts with the same problems.
    let short = arithmetic(3, 10, 9).into_problems();
    let long = arithmetic(3, 50, 9).into_problems();
    assert_eq!(short[..], long[..10]);
    // The default count.
    let spec: DatasetSpec = "arithmetic:2".parse().unwrap();
    assert_eq!(Dataset::open(&spec).unwrap().len(), 1000);
}

#[test]
fn bad_lines_are_skipped_counted_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        "{\"question\": \"Good one?\", \"answer\": \"#### 3\"}", // 1
        "",                                                      // 2: blank, silent
        "{\"question\": \"Broken\", \"answer\": \"#### 4\"",     // 3: invalid JSON
        r#"{"question": "No answer here"}"#,                     // 4
        r#"{"question": "   ", "answer": "5"}"#,                 // 5
        "{\"question\": \"Nothing after\", \"answer\": \"work\\n####\"}", // 6
        r#"{"question": "Good two?", "answer": 7}"#,             // 7
        r#"{"question": ["a list"], "answer": "1"}"#,            // 8
        r#"[1, 2]"#,                                             // 9
        r#"{"question": "Good three?", "answer": "8"}"#,         // 10
    ];
    let path = write_jsonl(dir.path(), "mixed.jsonl", &lines);
    let ds = Dataset::open(&DatasetSpec::jsonl(&path)).unwrap();
    let stats = ds.stats();
    assert_eq!(stats.loaded, 3);
    assert_eq!(
        ds.problems()
            .iter()
            .map(|p| p.answer.as_str())
            .collect::<Vec<_>>(),
        ["3", "7", "8"]
    );
    let got: Vec<(usize, &SkipReason)> =
        stats.skipped.iter().map(|s| (s.line, &s.reason)).collect();
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(matches!(got[0], (3, SkipReason::InvalidJson(_))));
    assert_eq!(got[1], (4, &SkipReason::MissingField("answer".into())));
    assert_eq!(got[2], (5, &SkipReason::EmptyQuestion));
    assert_eq!(got[3], (6, &SkipReason::NoFinalAnswer));
    assert!(matches!(got[4], (8, SkipReason::WrongType { .. })));
    assert_eq!(got[5], (9, &SkipReason::NotAnObject));
    // Each entry prints as a warning naming file:line and the reason.
    let shown = stats.skipped[1].to_string();
    assert!(
        shown.contains(&format!("{}:4", path.display()))
            && shown.contains("missing field `answer`"),
        "{shown}"
    );

    let strict = DatasetSpec::Jsonl {
        path: path.clone(),
        question_field: "question".into(),
        answer_field: "answer".into(),
        strict: true,
    };
    let err = Dataset::open(&strict).unwrap_err();
    assert!(
        matches!(err, DatasetError::BadRecord { line: 3, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with(&format!("{}:3: invalid JSON", path.display())),
        "{err}"
    );
}

#[test]
fn custom_fields_missing_files_and_empty_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_jsonl(
        dir.path(),
        "custom.json",
        &[
            r##"{"problem": "What is 2+2?", "solution": "2 + 2 = 4\n#### 4"}"##,
            r#"{"question": "Wrong fields", "answer": "1"}"#,
        ],
    );
    let spec = DatasetSpec::Jsonl {
        path: path.clone(),
        question_field: "problem".into(),
        answer_field: "solution".into(),
        strict: false,
    };
    let ds = Dataset::open(&spec).unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.problems()[0].question, "What is 2+2?");
    assert_eq!(ds.problems()[0].answer, "4");
    assert_eq!(
        ds.stats().skipped[0].reason,
        SkipReason::MissingField("problem".into())
    );

    let missing = dir.path().join("nowhere").join("train.jsonl");
    let err = Dataset::open(&DatasetSpec::jsonl(&missing)).unwrap_err();
    assert!(matches!(err, DatasetError::Read { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );

    let bad = write_jsonl(dir.path(), "bad.jsonl", &["not json", "", "{}"]);
    let err = Dataset::open(&DatasetSpec::jsonl(&bad)).unwrap_err();
    assert!(
        matches!(err, DatasetError::Empty { skipped: 2, .. }),
        "{err:?}"
    );

    let array = write_jsonl(
        dir.path(),
        "array.json",
        &[r#"[{"question": "q", "answer": "1"}]"#],
    );
    let err = Dataset::open(&DatasetSpec::jsonl(&array)).unwrap_err();
    assert!(matches!(err, DatasetError::JsonArray(_)), "{err:?}");

    assert!(matches!(
        Dataset::open(&DatasetSpec::arithmetic(0)),
        Err(DatasetError::InvalidSpec(_))
    ));
    assert!(matches!(
        Dataset::from_problems(Vec::new()),
        Err(DatasetError::Empty { .. })
    ));
}

fn small_dataset(n: usize) -> Dataset {
    Dataset::from_problems(
        (0..n)
            .map(|i| Problem {
                id: format!("p{i}"),
                question: format!("q{i}"),
                answer: i.to_string(),
                solution: None,
            })
            .collect(),
    )
    .expect("a non-empty dataset")
}

#[test]
fn the_cursor_never_repeats_within_an_epoch_and_reshuffles_each_epoch() {
    let ds = small_dataset(10);
    let mut c = DataCursor::for_dataset(&ds, 42);
    let mut epochs = Vec::new();
    for _ in 0..3 {
        let mut seen = Vec::new();
        for n in [3, 3, 4] {
            seen.extend(c.next_batch(&ds, n).unwrap().into_iter().map(|p| p.id));
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), 10, "every problem once per epoch: {seen:?}");
        epochs.push(seen);
    }
    assert_ne!(epochs[0], epochs[1]);
    assert_ne!(epochs[1], epochs[2]);
    assert_eq!(
        c.state(),
        CursorState {
            seed: 42,
            epoch: 3,
            position: 0,
            len: 10
        }
    );

    // A batch across the boundary: the rest of the epoch, then the next epoch's start.
    let mut a = DataCursor::new(10, 7).unwrap();
    let mut b = a.clone();
    a.next_indices(8);
    let across = a.next_indices(5);
    let whole: Vec<usize> = b.next_indices(15);
    assert_eq!(across, whole[8..13]);
    assert_eq!(a.state().epoch, 1);
    assert_eq!(a.state().position, 3);
    let tail: HashSet<usize> = whole[..10].iter().copied().collect();
    assert_eq!(tail.len(), 10);

    // Different seeds, different orders.
    let x = DataCursor::new(100, 1).unwrap().next_indices(100);
    let y = DataCursor::new(100, 2).unwrap().next_indices(100);
    assert_ne!(x, y);
}

#[test]
fn a_restored_cursor_continues_exactly() {
    let ds = small_dataset(23);
    let mut reference = DataCursor::for_dataset(&ds, 9);
    let mut resumed = DataCursor::for_dataset(&ds, 9);
    for _ in 0..5 {
        reference.next_batch(&ds, 4).unwrap();
        resumed.next_batch(&ds, 4).unwrap();
    }
    // Save mid-epoch, as a checkpoint would, and restore from the text.
    let saved = serde_json::to_string(&resumed.state()).unwrap();
    drop(resumed);
    let state: CursorState = serde_json::from_str(&saved).unwrap();
    assert_eq!((state.epoch, state.position), (0, 20));
    let mut resumed = DataCursor::restore(state).unwrap();
    for _ in 0..20 {
        assert_eq!(
            resumed.next_batch(&ds, 4).unwrap(),
            reference.next_batch(&ds, 4).unwrap()
        );
    }
    assert_eq!(resumed.state(), reference.state());

    // A dataset of another size is refused.
    assert!(resumed.next_batch(&small_dataset(5), 1).is_err());
}

#[test]
fn command_line_forms() {
    let parse = |s: &str| s.parse::<DatasetSpec>();
    assert_eq!(parse("arithmetic").unwrap(), DatasetSpec::arithmetic(1));
    assert_eq!(parse("arithmetic:3").unwrap(), DatasetSpec::arithmetic(3));
    assert_eq!(parse("gsm8k").unwrap(), DatasetSpec::Gsm8k { dir: None });
    assert_eq!(
        parse("gsm8k:/data/gsm").unwrap(),
        DatasetSpec::Gsm8k {
            dir: Some("/data/gsm".into())
        }
    );
    assert_eq!(
        parse("data/train.jsonl").unwrap(),
        DatasetSpec::jsonl("data/train.jsonl")
    );
    assert_eq!(
        parse("./x/Eval.JSON").unwrap(),
        DatasetSpec::jsonl("./x/Eval.JSON")
    );
    for bad in [
        "arithmetic:0",
        "arithmetic:9",
        "arithmetic:x",
        "gsm8k:",
        "mnist",
        "data/train.csv",
        "",
    ] {
        let err = parse(bad).unwrap_err().to_string();
        for form in [
            "`arithmetic`",
            "`arithmetic:LEVEL`",
            "`gsm8k`",
            "`.jsonl`",
            "`.json`",
        ] {
            assert!(err.contains(form), "{bad:?}: {err}");
        }
        assert!(err.contains(&format!("`{bad}`")), "{err}");
    }
}
