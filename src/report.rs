//! `orchestrator report RUN_DIR`: PNG plots of a run's `metrics.jsonl` and a markdown summary
//! beside them (`RUN_DIR/report/`).
//!
//! Every number in a metrics line may be null (no update that step, nothing scored): such points
//! are left out of their series, never drawn as zero. Text is drawn with a TrueType font found on
//! the system at run time (`--font`, else fontconfig's `sans-serif`, else DejaVu Sans), so the
//! build needs no font or C library.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

/// One line of `metrics.jsonl`: the keys the report reads (others are ignored).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Row {
    pub step: u64,
    pub timestamp: Option<f64>,
    pub rollouts: Option<u64>,
    pub scored: Option<u64>,
    pub unscored: Option<u64>,
    pub wins: Option<u64>,
    pub ties: Option<u64>,
    pub losses: Option<u64>,
    pub reward_mean: Option<f64>,
    pub reward_std: Option<f64>,
    pub position_consistency: Option<f64>,
    pub levels: Option<Vec<u64>>,
    pub share_at_top: Option<f64>,
    pub kl: Option<f64>,
    pub entropy: Option<f64>,
    pub response_tokens_mean: Option<f64>,
    pub response_tokens_max: Option<u64>,
    pub t_generate: Option<f64>,
    pub t_judge_tail: Option<f64>,
    pub t_learn: Option<f64>,
    /// One-step-off: the part of `t_learn` hidden behind generation (not stacked twice).
    pub t_overlap: Option<f64>,
    pub t_sync: Option<f64>,
    pub t_checkpoint: Option<f64>,
    pub t_other: Option<f64>,
    pub t_step: Option<f64>,
    pub judge_prompt_tokens: Option<u64>,
    pub judge_completion_tokens: Option<u64>,
    pub judge_usage_missing: Option<u64>,
    pub judge_tokens_total: Option<u64>,
    pub judge_cost: Option<f64>,
    pub judge_cost_total: Option<f64>,
    /// Every other key, for the keyed families (`judge/<member>/...`).
    #[serde(flatten)]
    pub other: std::collections::BTreeMap<String, serde_json::Value>,
}

impl Row {
    /// A panel member's number for this step (`judge/<member>/<key>`).
    fn member(&self, member: &str, key: &str) -> Option<f64> {
        self.other.get(&format!("judge/{member}/{key}"))?.as_f64()
    }
}

/// The panel members named in the rows, in name order (empty for one judge).
pub fn members(rows: &[Row]) -> Vec<String> {
    let mut names: Vec<String> = rows
        .iter()
        .flat_map(|r| r.other.keys())
        .filter_map(|k| k.strip_prefix("judge/")?.strip_suffix("/agreement").map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Reads `metrics.jsonl`; a bad line is an error naming `FILE:LINE` (and the key). A torn last
/// line (a run still writing, or killed mid-write) is skipped with a warning.
pub fn read_rows(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut rows = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                eprintln!("warning: {}:{}: incomplete last line skipped", path.display(), i + 1);
                continue;
            }
            Err(e) => bail!("{}:{}: not JSON: {e}", path.display(), i + 1),
        };
        if value.get("step").and_then(|s| s.as_u64()).is_none() {
            bail!("{}:{}: step: missing or not a non-negative integer", path.display(), i + 1);
        }
        let row: Row = serde_path_to_error::deserialize(value)
            .map_err(|e| anyhow::anyhow!("{}:{}: {}: {}", path.display(), i + 1, e.path(), e.inner()))?;
        rows.push(row);
    }
    if rows.is_empty() {
        bail!("{}: no metrics lines", path.display());
    }
    Ok(rows)
}

/// Finds a TrueType font for plot text and registers it with plotters.
pub fn load_font(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => find_font().context(
            "no TrueType font found for plot text (tried fontconfig's sans-serif and DejaVu Sans); \
             pass --font FILE.ttf",
        )?,
    };
    let bytes = std::fs::read(&path).with_context(|| format!("reading font {}", path.display()))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    for style in [FontStyle::Normal, FontStyle::Bold] {
        plotters::style::register_font("sans-serif", style, bytes)
            .map_err(|_| anyhow::anyhow!("{} is not a TrueType/OpenType font", path.display()))?;
    }
    Ok(path)
}

fn find_font() -> Option<PathBuf> {
    let fc = std::process::Command::new("fc-match").args(["-f", "%{file}", "sans-serif:style=Regular"]).output();
    if let Ok(out) = fc {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let ttf = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf") || e.eq_ignore_ascii_case("otf"));
        if out.status.success() && ttf && p.is_file() {
            return Some(p);
        }
    }
    [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
        "/Library/Fonts/Arial.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// A named series of (step, value) points; None values are gaps.
struct Series {
    name: String,
    color: RGBColor,
    points: Vec<(f64, Option<f64>)>,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn series(rows: &[Row], name: &str, color: RGBColor, f: impl Fn(&Row) -> Option<f64>) -> Series {
    Series { name: name.into(), color, points: rows.iter().map(|r| (r.step as f64, f(r))).collect() }
}

fn x_range(rows: &[Row]) -> std::ops::Range<f64> {
    let lo = rows.iter().map(|r| r.step).min().unwrap_or(0) as f64;
    let hi = rows.iter().map(|r| r.step).max().unwrap_or(1) as f64;
    if hi > lo {
        lo..hi
    } else {
        lo - 0.5..hi + 0.5
    }
}

fn y_range(all: &[&Series], floor_zero: bool) -> std::ops::Range<f64> {
    let vals = all.iter().flat_map(|s| s.points.iter().filter_map(|p| p.1)).filter(|v| v.is_finite());
    let (mut lo, mut hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    if floor_zero {
        lo = lo.min(0.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.08 } else { lo.abs().max(1.0) * 0.1 };
    // Head room for the legend.
    hi += pad + (hi - lo + pad) * 0.2;
    if !(floor_zero && lo == 0.0) {
        lo -= pad;
    }
    lo..hi
}

/// At most one tick per step, so a short run is labelled 1, 2, 3 rather than 1.2, 1.4, ...
fn x_ticks(x: &std::ops::Range<f64>) -> usize {
    ((x.end - x.start).round() as usize + 1).clamp(2, 10)
}

/// Steps are integers: no "2.0".
fn step_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else {
        format!("{x:.1}")
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e:?}")
}

/// Lines (with a dot on every point, so isolated points stay visible), split at nulls.
fn draw_lines(area: &Area, title: &str, x: std::ops::Range<f64>, y_desc: &str, all: &[Series], floor_zero: bool) -> Result<()> {
    let refs: Vec<&Series> = all.iter().collect();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x.clone(), y_range(&refs, floor_zero))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(x_ticks(&x))
        .x_desc("step")
        .x_label_formatter(&step_label)
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    for s in all {
        let color = s.color;
        let mut first = true;
        for run in s.points.split(|p| p.1.is_none()).filter(|r| !r.is_empty()) {
            let pts: Vec<(f64, f64)> = run.iter().map(|p| (p.0, p.1.unwrap())).collect();
            let line = chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2))).map_err(err)?;
            if first && !s.name.is_empty() {
                line.label(s.name.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3)));
                first = false;
            }
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled()))).map_err(err)?;
        }
    }
    let drawn = all.iter().any(|s| s.points.iter().any(|p| p.1.is_some()));
    legend_or_no_data(&mut chart, drawn)
}

/// The legend, or a note that every value was null (a plot left blank would look like a bug).
fn legend_or_no_data<'a>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>,
    drawn: bool,
) -> Result<()> {
    if drawn {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;
    } else {
        let area = chart.plotting_area();
        let (w, h) = area.dim_in_pixel();
        let style = TextStyle::from(("sans-serif", 20).into_font())
            .color(&RGBColor(110, 110, 110))
            .pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Center,
            ));
        let text = "no data: every value is null in metrics.jsonl";
        area.strip_coord_spec()
            .draw(&Text::new(text, (w as i32 / 2, h as i32 / 2), style))
            .map_err(err)?;
    }
    Ok(())
}

/// Stacked areas: layer i is drawn from the sum of layers < i to the sum of layers <= i. A step
/// where any layer is null is left out of the whole stack, unless `null_is_zero` (phase times:
/// a phase that did not run took no time), where only steps with no value at all are left out.
fn draw_stacked(area: &Area, title: &str, x: std::ops::Range<f64>, y_desc: &str, layers: &[Series], null_is_zero: bool) -> Result<()> {
    let n = layers.first().map(|l| l.points.len()).unwrap_or(0);
    let complete: Vec<usize> = (0..n)
        .filter(|&i| {
            if null_is_zero {
                layers.iter().any(|l| l.points[i].1.is_some())
            } else {
                layers.iter().all(|l| l.points[i].1.is_some())
            }
        })
        .collect();
    let mut cum = vec![0.0f64; n];
    let mut tops: Vec<Vec<(f64, f64, f64)>> = Vec::new();
    for l in layers {
        let mut pts = Vec::new();
        for &i in &complete {
            let base = cum[i];
            cum[i] += l.points[i].1.unwrap_or(0.0);
            pts.push((l.points[i].0, base, cum[i]));
        }
        tops.push(pts);
    }
    let ymax = complete.iter().map(|&i| cum[i]).fold(0.0f64, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x.clone(), 0.0..(if ymax > 0.0 { ymax * 1.45 } else { 1.0 }))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(x_ticks(&x))
        .x_desc("step")
        .x_label_formatter(&step_label)
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(err)?;
    for (l, pts) in layers.iter().zip(&tops) {
        let color = l.color;
        if pts.is_empty() {
            continue;
        }
        // A closed polygon: the layer's top left to right, then its base right to left.
        let mut poly: Vec<(f64, f64)> = pts.iter().map(|p| (p.0, p.2)).collect();
        poly.extend(pts.iter().rev().map(|p| (p.0, p.1)));
        if pts.len() == 1 {
            // One step: a bar of width 0.6 so it can be seen.
            let (x, b, t) = pts[0];
            poly = vec![(x - 0.3, t), (x + 0.3, t), (x + 0.3, b), (x - 0.3, b)];
        }
        chart
            .draw_series(std::iter::once(Polygon::new(poly, color.mix(0.75).filled())))
            .map_err(err)?
            .label(l.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 18, y + 5)], color.filled()));
        chart
            .draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.2)), color.stroke_width(1)))
            .map_err(err)?;
    }
    legend_or_no_data(&mut chart, !complete.is_empty())
}

const SIZE: (u32, u32) = (1000, 560);

fn png(path: &Path, size: (u32, u32), draw: impl FnOnce(&Area) -> Result<()>) -> Result<()> {
    // Drawn to a hidden sibling, then renamed, so a plot is never half-written.
    let tmp = path.with_file_name(format!(".{}.tmp-{}.png", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    let result = (|| {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        draw(&root)?;
        root.present().map_err(err)?;
        drop(root);
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// The plots, in the order they appear in the summary: (file name, caption).
pub const PLOTS: [(&str, &str); 7] = [
    ("reward.png", "Mean reward"),
    ("outcomes.png", "Win / tie / loss / unscored"),
    ("levels.png", "Ladder levels"),
    ("kl_entropy.png", "KL and entropy"),
    ("response_length.png", "Response length"),
    ("phase_times.png", "Phase times"),
    ("judge_tokens.png", "Judge tokens"),
];

/// A panel's plot, written only for a panel run.
pub const MEMBERS_PLOT: (&str, &str) = ("judge_members.png", "Panel members");

/// The step's wall time by phase, adding up to it: "learn" is the learner's time not hidden
/// behind generation (all of it unless one-step-off).
const PHASES: [(&str, fn(&Row) -> Option<f64>); 6] = [
    ("generate", |r| r.t_generate),
    ("judge tail", |r| r.t_judge_tail),
    ("learn", |r| Some(r.t_learn? - r.t_overlap.unwrap_or(0.0))),
    ("sync", |r| r.t_sync),
    ("checkpoint", |r| r.t_checkpoint),
    ("other", |r| r.t_other),
];

/// Writes every plot and `summary.md` into `out`.
pub fn write_report(rows: &[Row], out: &Path, metrics: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let x = x_range(rows);
    let c = PALETTE;
    png(&out.join(PLOTS[0].0), SIZE, |a| {
        let mean = series(rows, "reward mean", c[0], |r| r.reward_mean);
        let lo = series(rows, "mean ± std", c[7], |r| Some(r.reward_mean? - r.reward_std?));
        let hi = series(rows, "", c[7], |r| Some(r.reward_mean? + r.reward_std?));
        draw_lines(a, "Mean reward per step (with ± std)", x.clone(), "reward", &[mean, lo, hi], false)
    })?;
    png(&out.join(PLOTS[1].0), SIZE, |a| {
        let n = |f: fn(&Row) -> Option<u64>| move |r: &Row| f(r).map(|v| v as f64);
        let s = [
            series(rows, "wins", c[2], n(|r| r.wins)),
            series(rows, "ties", c[0], n(|r| r.ties)),
            series(rows, "losses", c[3], n(|r| r.losses)),
            series(rows, "unscored", c[7], n(|r| r.unscored)),
        ];
        draw_lines(a, "Judge outcomes per step (rollouts)", x.clone(), "rollouts", &s, true)
    })?;
    png(&out.join(PLOTS[2].0), SIZE, |a| {
        let depth = rows.iter().filter_map(|r| r.levels.as_ref().map(|l| l.len())).max().unwrap_or(0);
        let layers: Vec<Series> = (0..depth)
            .map(|lv| {
                series(rows, &format!("level {lv}"), c[lv % c.len()], |r| {
                    r.levels.as_ref().map(|l| l.get(lv).copied().unwrap_or(0) as f64)
                })
            })
            .collect();
        draw_stacked(a, "Tasks per ladder level", x.clone(), "tasks", &layers, false)
    })?;
    png(&out.join(PLOTS[3].0), (SIZE.0, SIZE.1 * 3 / 2), |a| {
        let (top, bottom) = a.split_vertically(SIZE.1 * 3 / 4);
        draw_lines(&top, "KL to the starting policy", x.clone(), "KL", &[series(rows, "kl", c[4], |r| r.kl)], false)?;
        draw_lines(&bottom, "Policy entropy", x.clone(), "nats/token", &[series(rows, "entropy", c[1], |r| r.entropy)], false)
    })?;
    png(&out.join(PLOTS[4].0), SIZE, |a| {
        let s = [
            series(rows, "mean", c[0], |r| r.response_tokens_mean),
            series(rows, "max", c[1], |r| r.response_tokens_max.map(|v| v as f64)),
        ];
        draw_lines(a, "Response length", x.clone(), "tokens", &s, true)
    })?;
    png(&out.join(PLOTS[5].0), SIZE, |a| {
        let layers: Vec<Series> =
            PHASES.iter().enumerate().map(|(i, (name, f))| series(rows, name, c[i], *f)).collect();
        draw_stacked(a, "Wall time per step by phase", x.clone(), "seconds", &layers, true)
    })?;
    png(&out.join(PLOTS[6].0), SIZE, |a| {
        let n = |f: fn(&Row) -> Option<u64>| move |r: &Row| f(r).map(|v| v as f64);
        let layers = [
            series(rows, "prompt", c[0], n(|r| r.judge_prompt_tokens)),
            series(rows, "completion", c[1], n(|r| r.judge_completion_tokens)),
        ];
        draw_stacked(a, "Judge tokens per step", x.clone(), "tokens", &layers, false)
    })?;
    let names = members(rows);
    if !names.is_empty() {
        png(&out.join(MEMBERS_PLOT.0), (SIZE.0, SIZE.1 * 3 / 2), |a| {
            let (top, bottom) = a.split_vertically(SIZE.1 * 3 / 4);
            let by = |key: &'static str| -> Vec<Series> {
                names.iter().enumerate().map(|(i, m)| series(rows, m, c[i % c.len()], |r| r.member(m, key))).collect()
            };
            draw_lines(&top, "Panel members: agreement with the panel", x.clone(), "agreement", &by("agreement"), true)?;
            draw_lines(&bottom, "Panel members: mean reward", x.clone(), "reward", &by("reward_mean"), false)
        })?;
    }
    let md = summary_md(rows, metrics);
    crate::fsutil::atomic_write(&out.join("summary.md"), md.as_bytes())
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "n/a".into())
}

/// The markdown summary.
pub fn summary_md(rows: &[Row], metrics: &Path) -> String {
    let n = rows.len();
    let q = n.div_ceil(4);
    let first_q = mean(rows[..q].iter().filter_map(|r| r.reward_mean));
    let last_q = mean(rows[n - q..].iter().filter_map(|r| r.reward_mean));
    let sum = |f: fn(&Row) -> Option<u64>| rows.iter().filter_map(f).sum::<u64>();
    let (w, t, l, u) = (sum(|r| r.wins), sum(|r| r.ties), sum(|r| r.losses), sum(|r| r.unscored));
    let mut s = String::new();
    s.push_str("# Run report\n\n");
    s.push_str(&format!("Source: `{}`\n\n", metrics.display()));
    s.push_str(&format!(
        "- Steps: {n} (step {} to {})\n",
        rows.first().map(|r| r.step).unwrap_or(0),
        rows.last().map(|r| r.step).unwrap_or(0)
    ));
    s.push_str(&format!(
        "- Mean reward, first quarter ({q} steps): {}; last quarter: {}\n",
        fmt(first_q, 4),
        fmt(last_q, 4)
    ));
    let scored = w + t + l;
    s.push_str(&format!(
        "- Judge outcomes, all steps: {w} wins, {t} ties, {l} losses, {u} unscored ({} rollouts; win share of scored {})\n",
        w + t + l + u,
        fmt((scored > 0).then(|| w as f64 / scored as f64), 3)
    ));
    if let Some(pc) = mean(rows.iter().filter_map(|r| r.position_consistency)) {
        s.push_str(&format!("- Mean position consistency (both-order judging): {pc:.3}\n"));
    }
    if let Some(last) = rows.iter().rev().find(|r| r.levels.is_some()) {
        let levels = last.levels.as_ref().unwrap();
        let hist: Vec<String> = levels.iter().enumerate().map(|(i, c)| format!("level {i}: {c}")).collect();
        s.push_str(&format!("- Final ladder levels (step {}): {}\n", last.step, hist.join(", ")));
        let total: u64 = levels.iter().sum();
        let top = last.share_at_top.or_else(|| {
            (total > 0).then(|| *levels.last().unwrap() as f64 / total as f64)
        });
        s.push_str(&format!("- Share of tasks at the top of their ladder: {}\n", fmt(top, 3)));
    }
    let (jp, jc) = (sum(|r| r.judge_prompt_tokens), sum(|r| r.judge_completion_tokens));
    if jp + jc > 0 || rows.iter().any(|r| r.judge_tokens_total.is_some()) {
        let missing = sum(|r| r.judge_usage_missing);
        s.push_str(&format!(
            "- Judge tokens, these steps: {} ({jp} prompt + {jc} completion; {:.0} per step){}\n",
            jp + jc,
            (jp + jc) as f64 / n as f64,
            if missing > 0 { format!("; {missing} replies reported no usage (counted as 0)") } else { String::new() }
        ));
        if let Some(total) = rows.last().and_then(|r| r.judge_tokens_total) {
            s.push_str(&format!("- Judge tokens, whole run up to step {}: {total}\n", rows.last().unwrap().step));
        }
        let cost: Vec<f64> = rows.iter().filter_map(|r| r.judge_cost).collect();
        if !cost.is_empty() {
            let total = rows.iter().rev().find_map(|r| r.judge_cost_total);
            s.push_str(&format!(
                "- Judge cost, these steps: {:.4}; whole run: {}\n",
                cost.iter().sum::<f64>(),
                fmt(total, 4)
            ));
        }
    }
    let wall: f64 = rows.iter().filter_map(|r| r.t_step).sum();
    s.push_str(&format!("- Total wall time (sum of step times): {wall:.1} s\n"));
    if wall > 0.0 {
        s.push_str("\n| phase | seconds | share |\n|---|---:|---:|\n");
        for (name, f) in PHASES {
            let t: f64 = rows.iter().filter_map(f).sum();
            s.push_str(&format!("| {name} | {t:.1} | {:.1}% |\n", 100.0 * t / wall));
        }
    }
    let names = members(rows);
    if !names.is_empty() {
        s.push_str("\n## Judge panel\n\n");
        s.push_str("Reward and agreement are means over the steps weighted by the pairs each member scored; agreement is with the panel's outcome (1 the same, 0.5 when one of the two is a tie, 0 opposite).\n\n");
        s.push_str("| member | scored | unscored | reward | agreement | position consistency | latency ms | failed calls | tokens | cost |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for m in &names {
            let total = |k: &str| rows.iter().filter_map(|r| r.member(m, k)).sum::<f64>();
            let weighted = |k: &str| {
                let (num, den) = rows.iter().fold((0.0, 0.0), |(a, b), r| match (r.member(m, k), r.member(m, "scored")) {
                    (Some(v), Some(n)) if n > 0.0 => (a + v * n, b + n),
                    _ => (a, b),
                });
                (den > 0.0).then(|| num / den)
            };
            let costs: Vec<f64> = rows.iter().filter_map(|r| r.member(m, "cost")).collect();
            s.push_str(&format!(
                "| {m} | {:.0} | {:.0} | {} | {} | {} | {} | {:.0} | {:.0} | {} |\n",
                total("scored"),
                total("unscored"),
                fmt(weighted("reward_mean"), 3),
                fmt(weighted("agreement"), 3),
                fmt(mean(rows.iter().filter_map(|r| r.member(m, "position_consistency"))), 3),
                fmt(mean(rows.iter().filter_map(|r| r.member(m, "latency_ms_mean"))), 0),
                total("failed_calls"),
                total("prompt_tokens") + total("completion_tokens"),
                fmt((!costs.is_empty()).then(|| costs.iter().sum()), 4),
            ));
        }
    }
    s.push_str("\n## Plots\n\n");
    let extra = (!names.is_empty()).then_some(MEMBERS_PLOT);
    for (file, caption) in PLOTS.into_iter().chain(extra) {
        s.push_str(&format!("### {caption}\n\n![{caption}]({file})\n\n"));
    }
    s
}

/// `orchestrator report RUN_DIR`.
pub fn run(run_dir: &Path, font: Option<&Path>) -> Result<PathBuf> {
    let metrics = run_dir.join("metrics.jsonl");
    if !metrics.is_file() {
        bail!("{} not found (is {} a run directory?)", metrics.display(), run_dir.display());
    }
    let rows = read_rows(&metrics)?;
    load_font(font)?;
    let out = run_dir.join("report");
    write_report(&rows, &out, &metrics)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_lines_name_file_line_and_key() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("metrics.jsonl");
        std::fs::write(&p, "{\"step\":1,\"kl\":null}\n{\"step\":2,\"kl\":\"high\"}\n").unwrap();
        let e = format!("{:#}", read_rows(&p).unwrap_err());
        assert!(e.contains("metrics.jsonl:2: kl:"), "{e}");
        std::fs::write(&p, "{\"step\":1}\n\n{\"epoch\":1}\n").unwrap();
        let e = format!("{:#}", read_rows(&p).unwrap_err());
        assert!(e.contains("metrics.jsonl:3: step"), "{e}");
        std::fs::write(&p, "{\"step\":1}\n{oops}\n{\"step\":3}\n").unwrap();
        let e = format!("{:#}", read_rows(&p).unwrap_err());
        assert!(e.contains("metrics.jsonl:2: not JSON"), "{e}");
        // A torn last line is skipped.
        std::fs::write(&p, "{\"step\":1,\"levels\":[3,1]}\n{\"step\":2,\"rew").unwrap();
        let rows = read_rows(&p).unwrap();
        assert_eq!((rows.len(), rows[0].levels.clone()), (1, Some(vec![3, 1])));
    }

    #[test]
    fn summary_quarters_and_totals() {
        let rows: Vec<Row> = (1..=8)
            .map(|s| Row {
                step: s,
                reward_mean: if s == 2 { None } else { Some(s as f64 / 10.0) },
                wins: Some(s),
                ties: Some(1),
                losses: Some(2),
                unscored: Some(0),
                levels: Some(vec![4 - s.min(4), s.min(4)]),
                t_step: Some(2.0),
                t_generate: Some(1.5),
                t_learn: Some(0.5),
                judge_prompt_tokens: Some(100),
                judge_completion_tokens: Some(10),
                judge_tokens_total: Some(110 * s + 5),
                ..Row::default()
            })
            .collect();
        let md = summary_md(&rows, Path::new("m.jsonl"));
        // First quarter = steps 1-2 (step 2 null) -> 0.1; last quarter = steps 7-8 -> 0.75.
        assert!(md.contains("first quarter (2 steps): 0.1000; last quarter: 0.7500"), "{md}");
        assert!(md.contains("36 wins, 8 ties, 16 losses, 0 unscored (60 rollouts"), "{md}");
        assert!(md.contains("level 0: 0, level 1: 4") && md.contains("top of their ladder: 1.000"), "{md}");
        assert!(md.contains("| generate | 12.0 | 75.0% |"), "{md}");
        assert!(md.contains("Judge tokens, these steps: 880 (800 prompt + 80 completion; 110 per step)"), "{md}");
        assert!(md.contains("whole run up to step 8: 885") && !md.contains("Judge cost"), "{md}");
    }
}
