use super::*;

fn role(superuser: bool, replication: bool, rds_member: bool, on_rds: bool) -> RoleInfo {
    RoleInfo {
        name: "walship".into(),
        replication,
        superuser,
        can_create_in_database: false,
        database: "app".into(),
        rds_replication_member: rds_member,
        on_rds,
    }
}

/// On RDS and Aurora `rolreplication` stays false: membership in `rds_replication` is the
/// right. Elsewhere a role of that name is an ordinary role and gives no right to stream.
#[test]
fn the_replication_right_comes_from_the_attribute_superuser_or_rds_replication_on_rds() {
    use ReplicationRight::*;
    for (r, right) in [
        (role(true, false, false, false), Superuser),
        (role(false, true, false, false), Attribute),
        (role(false, true, true, true), Attribute),
        (role(false, false, true, true), RdsReplication),
        (role(false, false, true, false), RdsRoleOffRds),
        (role(false, false, false, true), Missing),
        (role(false, false, false, false), Missing),
    ] {
        assert_eq!(r.replication_right(), right, "{r:?}");
    }
}
