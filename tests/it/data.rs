//! Tasks, importers and margin-aware selection, through the library and the real binary.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use orchestrator::data::{self, References, Task};

fn bin(args: &[&str]) -> Output {
    Command::new(common::bin()).args(args).output().expect("running orchestrator")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

// ---------------------------------------------------------------- WritingBench

fn wb_line(index: serde_json::Value, query: &str, extra: serde_json::Value) -> String {
    let mut v = serde_json::json!({
        "index": index,
        "domain1": "Literature & Arts",
        "domain2": "Poetry",
        "query": query,
        "checklist": [
            {"name": "Imagery", "criteria_description": "Vivid images.", "1-2": "none", "9-10": "striking"},
            "Plain-string criterion",
        ],
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v.to_string()
}

#[test]
fn writingbench_import_keeps_metadata_filters_language_and_names_bad_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let good = [
        wb_line(1.into(), "Write a poem about rain.", serde_json::json!({})),
        wb_line(2.into(), "写一首关于雨的诗。", serde_json::json!({})),
        wb_line(3.into(), "Ein Gedicht.", serde_json::json!({"lang": "de"})),
        String::new(),
        wb_line(4.into(), "Write a sonnet.", serde_json::json!({"domain1": "Education", "checklist": []})),
    ]
    .join("\n");
    let input = write(d, "benchmark_all.jsonl", &good);

    let out = d.join("wb.jsonl");
    let o = bin(&["import", "writingbench", input.to_str().unwrap(), "--out", out.to_str().unwrap(), "--lang", "en"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let tasks = data::read_tasks(&out, References::Optional).unwrap();
    assert_eq!(tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["wb-1", "wb-4"]);
    let t = &tasks[0];
    assert_eq!(t.prompt, "Write a poem about rain.");
    assert_eq!(t.lang.as_deref(), Some("en"));
    assert_eq!(t.domain.as_deref(), Some("Literature & Arts"));
    assert_eq!(t.subdomain.as_deref(), Some("Poetry"));
    assert!(t.references.is_empty());
    assert_eq!(
        t.criteria.as_deref(),
        Some("1. Imagery: Vivid images.\n   1-2: none\n   9-10: striking\n2. Plain-string criterion")
    );
    assert_eq!(tasks[1].criteria, None);
    assert_eq!(tasks[1].domain.as_deref(), Some("Education"));

    // No filter: every language, inferred (zh) or given (de).
    let all = writingbench_all(&input);
    assert_eq!(all.iter().map(|t| t.lang.clone().unwrap()).collect::<Vec<_>>(), ["en", "zh", "de", "en"]);

    // Every malformed line fails with FILE:LINE, and the output is left as it was.
    let before = std::fs::read(&out).unwrap();
    let cases: Vec<(String, &str)> = vec![
        (format!("{}\n{{\"index\": 5, \"query\": ", wb_line(1.into(), "a", serde_json::json!({}))), ":2: not a WritingBench line"),
        (wb_line(1.into(), "  ", serde_json::json!({})), ":1: index 1: empty query"),
        (format!("{}\n\n{}", wb_line(7.into(), "a", serde_json::json!({})), wb_line(7.into(), "b", serde_json::json!({}))), ":3: duplicate index 7 (first on line 1)"),
        (wb_line(1.into(), "a", serde_json::json!({"checklist": [{"1-2": "x"}]})), ":1: checklist[0]: checklist item has neither"),
        (wb_line(1.into(), "a", serde_json::json!({"checklist": [3]})), ":1: checklist[0]: checklist item must be"),
        (wb_line(serde_json::json!([1]), "a", serde_json::json!({})), ":1: not a WritingBench line"),
        (r#"{"index": 1, "checklist": []}"#.to_string(), ":1: not a WritingBench line: missing field `query`"),
    ];
    for (text, want) in cases {
        let bad = write(d, "bad.jsonl", &text);
        let o = bin(&["import", "writingbench", bad.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(&format!("bad.jsonl{want}")), "want {want:?} in {e}");
        assert_eq!(std::fs::read(&out).unwrap(), before, "output changed after a failed import");
    }
}

fn writingbench_all(input: &Path) -> Vec<Task> {
    data::writingbench::read(input, &[]).unwrap()
}

// ---------------------------------------------------------------- official parquet

#[cfg(feature = "parquet")]
/// One row of the official layout; `None` writes a null.
#[derive(Clone, Default)]
struct PqRow {
    messages: Option<Vec<(&'static str, &'static str)>>,
    gt_prompt: Option<&'static str>,
    target: Option<Vec<Option<&'static str>>>,
    criteria: Option<&'static str>,
    id: Option<&'static str>,
}

#[cfg(feature = "parquet")]
const SCHEMA: &str = "
message schema {
  OPTIONAL group prompt (LIST) {
    REPEATED group list {
      OPTIONAL group element {
        OPTIONAL BYTE_ARRAY content (UTF8);
        OPTIONAL BYTE_ARRAY role (UTF8);
      }
    }
  }
  OPTIONAL BYTE_ARRAY data_source (UTF8);
  OPTIONAL group reward_model {
    OPTIONAL group ground_truth {
      OPTIONAL BYTE_ARRAY criteria (UTF8);
      OPTIONAL BYTE_ARRAY id (UTF8);
      OPTIONAL BYTE_ARRAY prompt (UTF8);
      OPTIONAL group target (LIST) {
        REPEATED group list {
          OPTIONAL BYTE_ARRAY element (UTF8);
        }
      }
    }
    OPTIONAL BYTE_ARRAY style (UTF8);
  }
}";

#[cfg(feature = "parquet")]
/// Writes rows in the pandas/pyarrow layout (3-level lists, structs) with the parquet crate's
/// column writer (definition/repetition levels computed here); snappy (pyarrow's default) or zstd.
fn write_parquet(path: &Path, rows: &[PqRow]) {
    write_parquet_with(path, rows, parquet::basic::Compression::SNAPPY)
}

#[cfg(feature = "parquet")]
fn write_parquet_with(path: &Path, rows: &[PqRow], compression: parquet::basic::Compression) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;

    #[derive(Default)]
    struct Col {
        vals: Vec<ByteArray>,
        def: Vec<i16>,
        rep: Vec<i16>,
    }
    impl Col {
        fn opt(&mut self, v: Option<&str>, present_def: i16) {
            if let Some(v) = v {
                self.vals.push(v.into());
            }
            self.def.push(if v.is_some() { present_def } else { present_def - 1 });
            self.rep.push(0);
        }
    }
    let mut cols: Vec<Col> = (0..8).map(|_| Col::default()).collect();
    for r in rows {
        // prompt.list.element.{content, role}: max def 4, max rep 1.
        for (c, pick) in [(0usize, 1usize), (1, 0)] {
            match &r.messages {
                None => {
                    cols[c].def.push(0);
                    cols[c].rep.push(0);
                }
                Some(m) if m.is_empty() => {
                    cols[c].def.push(1);
                    cols[c].rep.push(0);
                }
                Some(m) => {
                    for (k, msg) in m.iter().enumerate() {
                        let v = if pick == 0 { msg.0 } else { msg.1 };
                        cols[c].vals.push(v.into());
                        cols[c].def.push(4);
                        cols[c].rep.push(i16::from(k > 0));
                    }
                }
            }
        }
        cols[2].opt(Some("writing"), 1);
        cols[3].opt(r.criteria, 3);
        cols[4].opt(r.id, 3);
        cols[5].opt(r.gt_prompt, 3);
        // target.list.element: max def 5, max rep 1.
        match &r.target {
            None => {
                cols[6].def.push(2);
                cols[6].rep.push(0);
            }
            Some(t) if t.is_empty() => {
                cols[6].def.push(3);
                cols[6].rep.push(0);
            }
            Some(t) => {
                for (k, e) in t.iter().enumerate() {
                    if let Some(e) = e {
                        cols[6].vals.push((*e).into());
                    }
                    cols[6].def.push(if e.is_some() { 5 } else { 4 });
                    cols[6].rep.push(i16::from(k > 0));
                }
            }
        }
        cols[7].opt(Some("model"), 2);
    }
    let schema = Arc::new(parquet::schema::parser::parse_message_type(SCHEMA).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(compression).build());
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let mut i = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        let c = &cols[i];
        col.typed::<ByteArrayType>().write_batch(&c.vals, Some(&c.def), Some(&c.rep)).unwrap();
        col.close().unwrap();
        i += 1;
    }
    assert_eq!(i, cols.len());
    rg.close().unwrap();
    w.close().unwrap();
}

#[cfg(feature = "parquet")]
fn good_rows() -> Vec<PqRow> {
    vec![
        PqRow {
            messages: Some(vec![("system", "You are a writer."), ("user", "Write a story about a fox.")]),
            gt_prompt: Some("Write a story about a fox."),
            target: Some(vec![Some("weak fox"), Some("better fox"), Some("best fox")]),
            criteria: Some("Originality"),
            id: Some("fox"),
        },
        PqRow {
            messages: Some(vec![("user", "Describe the sea.")]),
            gt_prompt: Some("Describe the sea."),
            target: Some(vec![Some("the sea is wet")]),
            criteria: None,
            id: Some("sea"),
        },
        // No chat messages: the ground-truth prompt is used; no id: named by its row.
        PqRow { messages: None, gt_prompt: Some("A haiku."), target: Some(vec![Some("old pond")]), ..Default::default() },
    ]
}

#[cfg(feature = "parquet")]
#[test]
fn parquet_import_reads_the_official_layout_and_names_bad_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pq = d.join("train.parquet");
    let zstd = parquet::basic::Compression::ZSTD(parquet::basic::ZstdLevel::default());
    write_parquet_with(&pq, &good_rows(), zstd);
    let out = d.join("tasks.jsonl");
    let o = bin(&["import", "parquet", pq.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let tasks = data::read_tasks(&out, References::Required).unwrap();
    let mut fox = Task::new("fox", "Write a story about a fox.", vec!["weak fox".into(), "better fox".into(), "best fox".into()]);
    fox.system = Some("You are a writer.".into());
    fox.criteria = Some("Originality".into());
    assert_eq!(tasks[0], fox);
    assert_eq!(tasks[1], Task::new("sea", "Describe the sea.", vec!["the sea is wet".into()]));
    assert_eq!(tasks[2], Task::new("row-2", "A haiku.", vec!["old pond".into()]));

    let before = std::fs::read(&out).unwrap();
    let base = good_rows();
    let with = |i: usize, f: &dyn Fn(&mut PqRow)| {
        let mut rows = base.clone();
        f(&mut rows[i]);
        rows
    };
    let cases: Vec<(Vec<PqRow>, &str)> = vec![
        (with(1, &|r| r.target = Some(vec![])), "row 1 (0-based): task \"sea\": no references"),
        (with(2, &|r| r.target = None), "row 2 (0-based): reward_model.ground_truth.target"),
        (with(0, &|r| r.target = Some(vec![Some("a"), None])), "row 0 (0-based): reward_model.ground_truth.target"),
        (with(2, &|r| r.id = Some("fox")), "row 2 (0-based): duplicate id \"fox\" (first in row 0)"),
        (with(1, &|r| r.messages = Some(vec![("user", "   ")])), "row 1 (0-based): task \"sea\": empty prompt"),
        (with(1, &|r| r.messages = Some(vec![("user", "a"), ("assistant", "b")])), "row 1 (0-based): prompt[1]: unexpected \"assistant\" message"),
        (with(2, &|r| r.gt_prompt = None), "row 2 (0-based): no user message"),
        (with(0, &|r| r.target = Some(vec![Some("a"), Some(" ")])), "row 0 (0-based): task \"fox\": references[1] is empty"),
    ];
    for (rows, want) in cases {
        let bad = d.join("bad.parquet");
        write_parquet(&bad, &rows);
        let o = bin(&["import", "parquet", bad.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert!(!o.status.success());
        let e = stderr(&o);
        assert!(e.contains(&format!("bad.parquet: {want}")), "want {want:?} in {e}");
        assert_eq!(std::fs::read(&out).unwrap(), before, "output changed after a failed import");
    }
    // Not a parquet file at all.
    let junk = write(d, "junk.parquet", "hello");
    let o = bin(&["import", "parquet", junk.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("junk.parquet: not a readable parquet file"), "{}", stderr(&o));
}

// ---------------------------------------------------------------- margin-aware selection

use orchestrator::testkit::scripted::{rules, Behavior, RecordedRequest, ScriptedServer};
use orchestrator::judge::{OpenAiJudge, Verdict};
use orchestrator::selection::{
    self, Answer, PairOrder, SelectionConfig, SelectionMode, TaskStatus, WeakerCandidates,
};

/// The quality an answer claims (`q=N`); the scripted judge prefers the higher one.
fn quality(a: &str) -> u32 {
    let at = a.find("q=").expect("answers carry q=N") + 2;
    a[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// A judge that knows the truth: the higher `q` wins (equal: tie) and the score is `q`;
/// any answer containing BROKEN gets a reply without a verdict (unscored after the re-ask).
fn truthful_judge() -> Behavior {
    Behavior::rule(|req: &RecordedRequest| {
        let prompt = req.prompt();
        if let Some((a, b)) = rules::answers(&prompt) {
            if a.contains("BROKEN") || b.contains("BROKEN") {
                return Behavior::reply("I refuse to decide.");
            }
            let v = match quality(&a).cmp(&quality(&b)) {
                std::cmp::Ordering::Greater => Verdict::First,
                std::cmp::Ordering::Less => Verdict::Second,
                std::cmp::Ordering::Equal => Verdict::Tie,
            };
            return rules::verdict_reply(req, v);
        }
        match rules::single_answer(&prompt) {
            Some(a) if !a.contains("BROKEN") => Behavior::Reply(format!("Fine.\n[[SCORE: {}]]", quality(&a))),
            _ => Behavior::reply("No score from me."),
        }
    })
}

fn judge_config(dir: &Path, base_url: &str, extra: &str) -> (PathBuf, orchestrator::config::Config) {
    let path = dir.join("select.toml");
    let text = format!(
        "[model]\npath = \"unused\"\n\n[judge]\nkind = \"openai\"\n\n[judge.openai]\nbase_url = {base_url:?}\n\
         model = \"scripted\"\napi_key_env = \"\"\nmax_retries = 1\nbackoff_initial_ms = 1\nbackoff_max_ms = 2\n\
         breaker_failures = 0\nmax_concurrency = 32\ntimeout_secs = 10\n\n{extra}\n"
    );
    std::fs::write(&path, text).unwrap();
    let cfg = orchestrator::config::Config::load_with_env(&path, Vec::<(String, String)>::new()).expect("config loads");
    (path, cfg)
}

fn answer(task: &str, source: &str, sample: usize, text: &str) -> Answer {
    Answer { task_id: task.into(), text: text.into(), source: source.into(), sample, origin: "test".into() }
}

/// Six tasks with a known truth (see `truthful_judge`).
fn scenario() -> (Vec<Task>, Vec<Answer>, Vec<Answer>) {
    let tasks: Vec<Task> = (1..=6).map(|i| Task::new(format!("t{i}"), format!("Prompt {i}"), vec![])).collect();
    let policy = vec![
        answer("t1", "policy", 0, "policy q=3"),
        answer("t2", "policy", 0, "policy q=5"),
        answer("t3", "policy", 0, "policy q=8"),
        answer("t4", "policy", 0, "policy BROKEN q=1"),
        answer("t5", "policy", 0, "policy q=4"),
        answer("t6", "policy", 0, "policy q=4"),
    ];
    let candidates = vec![
        answer("t1", "big", 0, "big t1 q=5"),
        answer("t1", "big", 1, "big t1 q=2"),
        answer("t1", "mid", 0, "mid t1 q=3"),
        answer("t2", "big", 0, "big t2 q=6"),
        answer("t2", "mid", 0, "mid t2 BROKEN q=9"),
        answer("t3", "big", 0, "big t3 q=1"),
        answer("t3", "mid", 0, "mid t3 q=2"),
        answer("t4", "big", 0, "big t4 q=5"),
        answer("t5", "mid", 0, "mid t5 q=4"),
        answer("t5", "mid", 1, "  "),
    ];
    (tasks, policy, candidates)
}

fn by_id<'a>(s: &'a selection::Selection, id: &str) -> &'a selection::TaskScore {
    s.tasks.iter().find(|t| t.id == id).unwrap()
}

fn cand_scores(s: &selection::Selection, id: &str) -> Vec<Option<f64>> {
    by_id(s, id).candidates.iter().map(|c| c.score).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairwise_selection_gives_exact_margins_ladders_and_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let server = ScriptedServer::start(truthful_judge()).await.unwrap();
    let (_, cfg) = judge_config(tmp.path(), &server.base_url(), "");
    let judge = OpenAiJudge::new(&cfg.judge).unwrap();
    let (tasks, policy, candidates) = scenario();
    for order in [PairOrder::ReferenceFirst, PairOrder::ResponseFirst, PairOrder::Both, PairOrder::Random] {
        let sel = SelectionConfig { mode: SelectionMode::Pairwise, order: Some(order), top_k: Some(2), ..Default::default() };
        let s = selection::select(&tasks, &policy, &candidates, &judge, &sel).await.unwrap();
        assert_eq!(cand_scores(&s, "t1"), [Some(1.0), Some(0.0), Some(0.5)], "{order:?}");
        assert_eq!(cand_scores(&s, "t2"), [Some(1.0), None]);
        assert_eq!(cand_scores(&s, "t3"), [Some(0.0), Some(0.0)]);
        assert_eq!(cand_scores(&s, "t4"), [None]);
        assert_eq!(cand_scores(&s, "t5"), [Some(0.5)]);
        let margins: Vec<Option<f64>> = s.tasks.iter().map(|t| t.margin).collect();
        assert_eq!(margins, [Some(0.5), Some(0.5), Some(-0.5), None, Some(0.0), None]);
        let status: Vec<TaskStatus> = s.tasks.iter().map(|t| t.status).collect();
        use TaskStatus::*;
        assert_eq!(status, [Kept, Kept, NoReference, Unscored, BelowCut, NoCandidates]);
        // Kept by decreasing margin (ties in input order), ladders weakest..strongest by score,
        // the candidate that lost to the policy dropped.
        assert_eq!(s.kept.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
        assert_eq!(s.kept[0].references, ["mid t1 q=3", "big t1 q=5"]);
        assert_eq!(s.kept[1].references, ["big t2 q=6"]);
        let m = &s.summary;
        let calls = if order == PairOrder::Both { 18 } else { 9 };
        assert_eq!((m.judge_calls, m.unscored_calls), (calls, if order == PairOrder::Both { 4 } else { 2 }));
        assert_eq!((m.unscored_candidates, m.empty_candidates, m.weaker_dropped, m.weaker_kept), (2, 1, 3, 0));
        assert_eq!((m.kept, m.below_cut, m.no_reference, m.unscored_tasks, m.no_candidates), (2, 1, 1, 1, 1));
        let hist: Vec<(f64, usize)> = m.margin_histogram.iter().map(|b| (b.lo, b.count)).collect();
        assert_eq!(hist, [(-0.5, 1), (0.0, 1), (0.5, 2)]);
    }
    // Every comparison showed the candidate first under reference-first: checked on the wire.
    server.reset_stats();
    let sel = SelectionConfig { mode: SelectionMode::Pairwise, ..Default::default() };
    selection::select(&tasks[..1], &policy[..1], &candidates[..3], &judge, &sel).await.unwrap();
    for r in server.requests() {
        let (first, second) = rules::answers(&r.prompt()).unwrap();
        assert!(!first.starts_with("policy") && second.starts_with("policy"), "{first} / {second}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointwise_selection_and_weaker_candidates_as_lower_rungs() {
    let tmp = tempfile::tempdir().unwrap();
    let server = ScriptedServer::start(truthful_judge()).await.unwrap();
    let (_, cfg) = judge_config(tmp.path(), &server.base_url(), "");
    let judge = OpenAiJudge::new(&cfg.judge).unwrap();
    let (tasks, policy, candidates) = scenario();
    let sel = SelectionConfig { min_margin: Some(0.5), ..Default::default() };
    let s = selection::select(&tasks, &policy, &candidates, &judge, &sel).await.unwrap();
    assert_eq!(cand_scores(&s, "t1"), [Some(5.0), Some(2.0), Some(3.0)]);
    assert_eq!(cand_scores(&s, "t4"), [Some(5.0)]);
    let margins: Vec<Option<f64>> = s.tasks.iter().map(|t| t.margin).collect();
    assert_eq!(margins, [Some(2.0), Some(1.0), Some(-6.0), None, Some(0.0), None]);
    assert_eq!(by_id(&s, "t4").policy_unscored, 1);
    assert_eq!(s.kept.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
    assert_eq!(s.kept[0].references, ["mid t1 q=3", "big t1 q=5"]);
    // 6 policy ratings (t6 has no candidates: not rated) -> 5, plus 9 non-empty candidates.
    assert_eq!((s.summary.judge_calls, s.summary.unscored_calls), (14, 2));
    let hist: Vec<(f64, usize)> = s.summary.margin_histogram.iter().map(|b| (b.lo, b.count)).collect();
    assert_eq!(hist, [(-6.0, 1), (0.0, 1), (1.0, 1), (2.0, 1)]);

    let sel = SelectionConfig { weaker_candidates: WeakerCandidates::Keep, top_fraction: Some(0.5), ..Default::default() };
    let s = selection::select(&tasks, &policy, &candidates, &judge, &sel).await.unwrap();
    // 4 scored tasks, half of them: t1 and t2; t3's weaker candidates now form its ladder.
    assert_eq!(s.kept.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
    assert_eq!(s.kept[0].references, ["big t1 q=2", "mid t1 q=3", "big t1 q=5"]);
    assert_eq!(by_id(&s, "t3").status, TaskStatus::BelowCut);
    assert_eq!((s.summary.weaker_dropped, s.summary.weaker_kept), (0, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairwise_order_strategies_against_a_position_biased_judge() {
    let tmp = tempfile::tempdir().unwrap();
    // Always prefers whatever it reads first.
    let server = ScriptedServer::start(rules::always(Verdict::First)).await.unwrap();
    let (_, cfg) = judge_config(tmp.path(), &server.base_url(), "");
    let judge = OpenAiJudge::new(&cfg.judge).unwrap();
    let tasks = vec![Task::new("t", "p", vec![])];
    let policy = vec![answer("t", "policy", 0, "mine")];
    let candidates = vec![answer("t", "a", 0, "theirs")];
    let score = |order| {
        let sel = SelectionConfig { mode: SelectionMode::Pairwise, order: Some(order), weaker_candidates: WeakerCandidates::Keep, ..Default::default() };
        let (tasks, policy, candidates, judge) = (&tasks, &policy, &candidates, &judge);
        async move { selection::select(tasks, policy, candidates, judge, &sel).await.unwrap().tasks[0].candidates[0].score }
    };
    assert_eq!(score(PairOrder::ReferenceFirst).await, Some(1.0));
    assert_eq!(score(PairOrder::ResponseFirst).await, Some(0.0));
    assert_eq!(score(PairOrder::Both).await, Some(0.5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_cli_end_to_end_reads_generate_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let server = ScriptedServer::start(truthful_judge()).await.unwrap();
    let (config, _) = judge_config(d, &server.base_url(), "[selection]\nmode = \"pairwise\"\ntop_k = 2\n");
    let (tasks, policy, candidates) = scenario();
    let tasks_path = d.join("tasks.jsonl");
    data::write_tasks(&tasks_path, &tasks, References::Optional).unwrap();
    // Lines as `orchestrator generate` writes them (extra fields included).
    let gen_line = |a: &Answer| {
        serde_json::json!({"id": a.task_id, "sample": a.sample, "response": a.text, "finish_reason": "stop",
            "prompt_tokens": 3, "completion_tokens": 4, "source": a.source, "seed": 1}).to_string()
    };
    let write_answers = |name: &str, xs: &[&Answer]| {
        write(d, name, &xs.iter().map(|a| gen_line(a)).collect::<Vec<_>>().join("\n"))
    };
    let policy_path = write_answers("policy.jsonl", &policy.iter().collect::<Vec<_>>());
    let big = write_answers("big.jsonl", &candidates.iter().filter(|a| a.source == "big").collect::<Vec<_>>());
    let mid = write_answers("mid.jsonl", &candidates.iter().filter(|a| a.source == "mid").collect::<Vec<_>>());
    let out = d.join("selected.jsonl");
    let o = tokio::task::spawn_blocking({
        let args: Vec<String> = ["select", "--config", config.to_str().unwrap(), "--tasks", tasks_path.to_str().unwrap(),
            "--policy", policy_path.to_str().unwrap(), "--candidates", big.to_str().unwrap(),
            "--candidates", mid.to_str().unwrap(), "--out", out.to_str().unwrap()]
            .iter().map(|s| s.to_string()).collect();
        move || Command::new(common::bin()).args(&args).output().unwrap()
    })
    .await
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let kept = data::read_tasks(&out, References::Required).unwrap();
    assert_eq!(kept.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["t1", "t2"]);
    assert_eq!(kept[0].references, ["mid t1 q=3", "big t1 q=5"]);
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("selected.report.json")).unwrap()).unwrap();
    assert_eq!(report["summary"]["unscored_calls"], 2);
    assert_eq!(report["summary"]["kept"], 2);
    assert!(stderr(&o).contains("kept 2"), "{}", stderr(&o));

    // A candidate line for an unknown task names its file and line; nothing is written.
    let before = std::fs::read(&out).unwrap();
    let bad = write(d, "bad.jsonl", &format!("{}\n{}", gen_line(&candidates[0]), gen_line(&answer("t9", "x", 0, "q=1"))));
    let o = Command::new(common::bin())
        .args(["select", "--config", config.to_str().unwrap(), "--tasks", tasks_path.to_str().unwrap(),
            "--policy", policy_path.to_str().unwrap(), "--candidates", bad.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bad.jsonl:2: task \"t9\" is not in the task file"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), before);

    // Nothing above the threshold: an error, and the old output stays.
    let o = Command::new(common::bin())
        .args(["select", "--config", config.to_str().unwrap(), "--tasks", tasks_path.to_str().unwrap(),
            "--policy", policy_path.to_str().unwrap(), "--candidates", big.to_str().unwrap(), "--out", out.to_str().unwrap(),
            "--min-margin", "0.9"])
        .output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no task was kept"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn data_curriculum_and_selection_config_keys_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tasks = write(d, "tasks.jsonl", "{\"id\": \"a\", \"prompt\": \"p\", \"references\": [\"r\"]}\n");
    let ok = write(d, "ok.toml", "[model]\npath = \"m\"\n[data]\ntasks = \"tasks.jsonl\"\n[curriculum]\nmode = \"static-strongest\"\nadvance_rule = \"majority\"\n[selection]\nmode = \"pairwise\"\norder = \"both\"\ntop_fraction = 0.25\nweaker_candidates = \"keep\"\n");
    let cfg = orchestrator::config::Config::load_with_env(&ok, Vec::<(String, String)>::new()).unwrap();
    assert_eq!(cfg.data.tasks.as_deref(), Some(tasks.as_path()));
    assert_eq!(cfg.curriculum.mode, orchestrator::curriculum::CurriculumMode::StaticStrongest);
    assert_eq!(cfg.curriculum.advance_rule, orchestrator::curriculum::AdvanceRule::Majority);
    assert_eq!((cfg.selection.mode, cfg.selection.order), (SelectionMode::Pairwise, Some(PairOrder::Both)));
    let err = |name: &str, text: &str| {
        let p = write(d, name, &format!("[model]\npath = \"m\"\n{text}"));
        format!("{:#}", orchestrator::config::Config::load_with_env(&p, Vec::<(String, String)>::new()).unwrap_err())
    };
    let e = err("a.toml", "[selection]\ntop_k = 0\nconcurrency = 0\ntop_fraction = 1.5\n");
    assert!(e.contains("a.toml") && e.contains("selection.top_k: must be >= 1") && e.contains("selection.concurrency: must be >= 1")
        && e.contains("selection.top_fraction: must be in (0, 1], got 1.5") && e.contains("set top_k or top_fraction, not both"), "{e}");
    let e = err("b.toml", "[curriculum]\nmode = \"sideways\"\n");
    assert!(e.contains("b.toml") && e.contains("curriculum.mode") && e.contains("sideways"), "{e}");
    let e = err("c.toml", "[curriculum]\nadvance = \"any\"\n");
    assert!(e.contains("curriculum") && e.contains("advance"), "{e}");
    let e = err("d.toml", "[data]\ntasks = \"missing.jsonl\"\n");
    assert!(e.contains("data.tasks") && e.contains("missing.jsonl is not a file"), "{e}");
}

/// One model builds ladders from its own samples: `generate` on the tiny model writes the policy
/// answers and the candidates, `select` reads those files as they are. The scripted judge rates
/// an answer by its length (1 + chars % 10), so the expected margins follow from the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ladders_from_the_models_own_generate_output() {
    use orchestrator::testkit::tiny::TinySpec;
    common::init();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let rate = |a: &str| 1 + (a.chars().count() % 10) as u32;
    let server = ScriptedServer::start(rules::score_by(rate)).await.unwrap();
    let model = common::tiny_model(&d.join("model"), &TinySpec::qwen2(3));
    let extra = format!(
        "[engine.sampling]\nmax_new_tokens = 16\n\n[judge]\nkind = \"openai\"\n\n[judge.openai]\nbase_url = {:?}\n\
         model = \"scripted\"\napi_key_env = \"\"\nmax_retries = 0\n\n[selection]\nmode = \"pointwise\"\n",
        server.base_url()
    );
    let (config, _) = common::config_for(d, &model, &extra);
    let tasks: Vec<Task> = (0..4).map(|i| Task::new(format!("w{i}"), format!("Write about topic {i}."), vec![])).collect();
    let tasks_path = d.join("tasks.jsonl");
    data::write_tasks(&tasks_path, &tasks, References::Optional).unwrap();
    let policy = d.join("policy.jsonl");
    let cands = d.join("cands.jsonl");
    let out = d.join("selected.jsonl");
    let c = config.to_str().unwrap().to_string();
    let t = tasks_path.to_str().unwrap().to_string();
    let (p, cs, o) = (policy.to_str().unwrap().to_string(), cands.to_str().unwrap().to_string(), out.to_str().unwrap().to_string());
    let outputs = tokio::task::spawn_blocking(move || {
        let gen1 = bin(&["generate", "--config", &c, "--prompts", &t, "--out", &p, "--n", "1", "--seed", "1", "--source", "policy"]);
        let gen2 = bin(&["generate", "--config", &c, "--prompts", &t, "--out", &cs, "--n", "3", "--seed", "2", "--source", "self-T1"]);
        let sel = bin(&["select", "--config", &c, "--tasks", &t, "--policy", &p, "--candidates", &cs, "--out", &o, "--keep-weaker"]);
        (gen1, gen2, sel)
    })
    .await
    .unwrap();
    for o in [&outputs.0, &outputs.1, &outputs.2] {
        assert!(o.status.success(), "{}", stderr(o));
    }
    // Expected, from the generated files and the judge's rule applied to what the judge is
    // shown: the answer with verdict-like markup neutralised, trimmed by the template reader.
    let rate = |a: &str| rate(orchestrator::judge::verdict::neutralise(a).trim());
    let pol = selection::read_answers(&policy).unwrap();
    let cand = selection::read_answers(&cands).unwrap();
    assert_eq!((pol.len(), cand.len()), (4, 12));
    assert!(cand.iter().all(|a| a.source == "self-T1"));
    assert!(cand.iter().filter(|a| !a.text.trim().is_empty()).count() >= 8, "the tiny model wrote text");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("selected.report.json")).unwrap()).unwrap();
    let kept = data::read_tasks(&out, References::Required).unwrap();
    for (i, task) in tasks.iter().enumerate() {
        let p = rate(&pol[i].text) as f64;
        let mut mine: Vec<(u32, &str)> =
            cand.iter().filter(|a| a.task_id == task.id && !a.text.trim().is_empty()).map(|a| (rate(&a.text), a.text.as_str())).collect();
        let entry = &report["tasks"][i];
        assert_eq!(entry["id"], task.id.as_str());
        assert_eq!(entry["policy_score"], p);
        if mine.is_empty() {
            assert_eq!(entry["status"], "no-candidates");
            continue;
        }
        let best = mine.iter().map(|m| m.0).max().unwrap() as f64;
        assert_eq!(entry["margin"], best - p, "task {}", task.id);
        mine.sort_by_key(|m| m.0); // stable: ties keep file order, like the ladder
        let ladder: Vec<&str> = mine.iter().map(|m| m.1).collect();
        let k = kept.iter().find(|k| k.id == task.id).expect("every task with candidates is kept");
        assert_eq!(k.references, ladder);
    }
}
