use super::*;

#[test]
fn system_time_round_trip() {
    let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
    let pg = PgTimestamp::from_system_time(t);
    assert_eq!(pg.to_system_time(), Some(t));
    assert_eq!(pg.unix_millis(), 1_700_000_000_123);
}
