//! The Rust example of the book's "Writing events from applications" chapter, compiled so it
//! cannot drift from the crate: the chapter includes the parts between the ANCHOR comments.
//! One business change and its event in one transaction, through each driver: as a row with
//! tokio-postgres, as a logical message with sqlx.
//!
//! It compiles with both drivers (the workspace's test build enables them); running it needs a
//! PostgreSQL with the SQL kit and an `orders` table: `order_paid POSTGRES_URL`.

#![allow(clippy::print_stdout)]

use std::error::Error;

// ANCHOR: use
use walship_outbox::{Outbox, OutboxEvent};
// ANCHOR_END: use

/// A typed payload, for [`OutboxEvent::serialized`].
#[derive(serde::Serialize)]
struct OrderPaid {
    id: i64,
    status: &'static str,
}

// ANCHOR: tokio_postgres
/// tokio-postgres, as a row in `public.outbox`.
async fn with_tokio_postgres(
    client: &mut tokio_postgres::Client,
) -> Result<uuid::Uuid, Box<dyn Error>> {
    let outbox = Outbox::new();
    let tx = client.transaction().await?;
    tx.execute(
        "UPDATE orders SET status = 'paid' WHERE id = $1",
        &[&42_i64],
    )
    .await?;
    let event_id = outbox
        .add(
            &tx,
            &OutboxEvent::new("order", "42", "OrderPaid", serde_json::json!({"id": 42})),
        )
        .await?;
    tx.commit().await?;
    Ok(event_id)
}
// ANCHOR_END: tokio_postgres

// ANCHOR: sqlx
/// sqlx, as a logical message (walship: `outbox.message_prefixes = ["outbox"]`).
async fn with_sqlx(pool: &sqlx::PgPool) -> Result<uuid::Uuid, Box<dyn Error>> {
    let order_paid = OrderPaid {
        id: 42,
        status: "paid",
    };
    let outbox = Outbox::messages("outbox");
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE orders SET status = 'paid' WHERE id = $1")
        .bind(42_i64)
        .execute(&mut *tx)
        .await?;
    let event_id = outbox
        .add(
            &mut tx,
            &OutboxEvent::serialized("order", "42", "OrderPaid", &order_paid)?,
        )
        .await?;
    tx.commit().await?;
    Ok(event_id)
}
// ANCHOR_END: sqlx

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: order_paid POSTGRES_URL")?;
    let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row_event = with_tokio_postgres(&mut client).await?;
    let pool = sqlx::PgPool::connect(&url).await?;
    let message_event = with_sqlx(&pool).await?;
    println!("{row_event} {message_event}");
    Ok(())
}
