use super::*;

#[test]
fn display_and_parse_round_trip() {
    for v in [
        0u64,
        1,
        0xFFFF_FFFF,
        0x1_0000_0000,
        u64::MAX,
        0x16_B374_D848,
    ] {
        let lsn = Lsn(v);
        assert_eq!(lsn.to_string().parse::<Lsn>(), Ok(lsn));
    }
    assert_eq!(Lsn(0).to_string(), "0/0");
}

#[test]
fn rejects_malformed() {
    for s in [
        "",
        "/",
        "1/",
        "/1",
        "12",
        "g/1",
        "1/2/3",
        "123456789/0",
        "-1/0",
        // Regression: `u32::from_str_radix` accepts a sign, PostgreSQL does not.
        "+1/0",
        "1/+0",
        "+/0",
        " 1/0",
        "1/0 ",
    ] {
        assert!(s.parse::<Lsn>().is_err(), "{s:?} parsed");
    }
}
