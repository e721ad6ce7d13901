//! Pending acknowledgements: rows written with the registration, performed on the server by
//! the IMAP side, then deleted here together with an `acked` event.

use sqlx::Row;

use super::records::{Loc, insert_event};
use super::{PendingAck, Registry, RegistryError, now};

impl Registry {
    /// Acknowledgements not yet confirmed by the server, oldest first.
    pub async fn pending_acks(
        &self,
        mailbox_id: &str,
        folder: &str,
    ) -> Result<Vec<PendingAck>, RegistryError> {
        let rows = sqlx::query(
            "SELECT id, message_id, uidvalidity, uid, action FROM pending_acks \
             WHERE mailbox_id = $1 AND folder = $2 ORDER BY id",
        )
        .bind(mailbox_id)
        .bind(folder)
        .fetch_all(&self.pool)
        .await
        .map_err(RegistryError::db("read pending acks"))?;
        Ok(rows
            .iter()
            .map(|r| PendingAck {
                id: r.get(0),
                message_id: r.get(1),
                uidvalidity: r.get::<i64, _>(2) as u32,
                uid: r.get::<i64, _>(3) as u32,
                action: r.get(4),
            })
            .collect())
    }

    /// Deletes acknowledgements the server confirmed (`kind` = `acked`) or that can no longer
    /// apply (`ack-dropped`), each with its audit event.
    pub async fn acks_done(
        &self,
        mailbox_id: &str,
        folder: &str,
        acks: &[PendingAck],
        kind: &str,
    ) -> Result<(), RegistryError> {
        if acks.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        let at = now();
        for ack in acks {
            sqlx::query("DELETE FROM pending_acks WHERE id = $1")
                .bind(ack.id)
                .execute(&mut *tx)
                .await
                .map_err(RegistryError::db("delete pending ack"))?;
            let loc = Loc {
                owner: mailbox_id,
                folder,
                uidvalidity: Some(i64::from(ack.uidvalidity)),
                uid: Some(i64::from(ack.uid)),
                source: "imap",
                source_ref: None,
            };
            insert_event(
                &mut tx,
                kind,
                &at,
                &loc,
                Some(ack.message_id),
                Some(&ack.action),
            )
            .await?;
        }
        tx.commit()
            .await
            .map_err(RegistryError::db("commit acks"))?;
        Ok(())
    }
}
