//! Unit tests of the pipeline loop.
use super::*;

#[test]
fn backoff_grows_and_is_capped() {
    for attempt in 0..40 {
        let d = backoff(attempt);
        assert!(d <= BACKOFF_MAX, "{d:?}");
        assert!(d >= BACKOFF_MIN / 2, "{d:?}");
    }
    assert!(backoff(20) >= BACKOFF_MAX / 2);
}
