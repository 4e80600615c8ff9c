//! Range checks for config sections. A leaf every section's `validate` uses, so `config` can
//! assemble the sections without the sections importing `config` back.
//!
//! Every numeric check also rejects NaN and infinities: TOML accepts `inf` and `nan`, and a
//! non-finite duration or rate that reaches the run panics or poisons it hours later.

/// The longest duration any setting may ask for: 30 days. `Duration::from_secs_f64` panics far
/// above this, and nothing in a run should wait longer.
pub const MAX_SECS: f64 = 30.0 * 24.0 * 3600.0;

/// Collects range errors as `key.path: message` lines.
#[derive(Default)]
pub struct Problems(pub Vec<String>);

impl Problems {
    pub fn push(&mut self, key: &str, msg: impl std::fmt::Display) {
        self.0.push(format!("{key}: {msg}"));
    }
    /// Checks that `v` is a finite number; true if it is.
    pub fn finite(&mut self, key: &str, v: f64) -> bool {
        if !v.is_finite() {
            self.push(key, format!("must be a finite number, got {v}"));
        }
        v.is_finite()
    }
    /// Checks `lo < v <= hi`.
    pub fn open_closed(&mut self, key: &str, v: f64, lo: f64, hi: f64) {
        if self.finite(key, v) && !(v > lo && v <= hi) {
            self.push(key, format!("must be in ({lo}, {hi}], got {v}"));
        }
    }
    pub fn at_least(&mut self, key: &str, v: f64, lo: f64) {
        if self.finite(key, v) && !(v >= lo) {
            self.push(key, format!("must be >= {lo}, got {v}"));
        }
    }
    pub fn positive(&mut self, key: &str, v: f64) {
        if self.finite(key, v) && !(v > 0.0) {
            self.push(key, format!("must be > 0, got {v}"));
        }
    }
    /// A duration in seconds: finite, at least `lo`, at most [`MAX_SECS`].
    pub fn seconds(&mut self, key: &str, v: f64, lo: f64) {
        if self.finite(key, v) && !(v >= lo && v <= MAX_SECS) {
            self.push(key, format!("must be a duration in seconds in [{lo}, {MAX_SECS}] (30 days), got {v}"));
        }
    }
    /// A duration in milliseconds, at most [`MAX_SECS`].
    pub fn millis(&mut self, key: &str, v: u64, lo: u64) {
        if !(v >= lo && (v as f64) <= MAX_SECS * 1000.0) {
            self.push(key, format!("must be in [{lo}, {}] milliseconds (30 days), got {v}", (MAX_SECS * 1000.0) as u64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_named() {
        let mut p = Problems::default();
        p.at_least("a.x", f64::INFINITY, 0.0);
        p.positive("a.y", f64::NAN);
        p.open_closed("a.z", f64::NEG_INFINITY, 0.0, 1.0);
        p.seconds("a.t", 1e20, 0.0);
        p.seconds("a.u", 5.0, 0.0);
        p.millis("a.m", u64::MAX, 1);
        assert_eq!(p.0.len(), 5, "{:?}", p.0);
        assert!(p.0[0].starts_with("a.x: must be a finite number, got inf"), "{:?}", p.0);
        assert!(p.0[1].starts_with("a.y: must be a finite number, got NaN"), "{:?}", p.0);
        assert!(p.0[3].starts_with("a.t: must be a duration"), "{:?}", p.0);
        assert!(p.0[4].starts_with("a.m: must be in [1, "), "{:?}", p.0);
    }
}
