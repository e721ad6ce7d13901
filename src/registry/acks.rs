//! Pending acknowledgements: rows written with the registration, performed on the server by
//! the IMAP side, then deleted here together with an `acked` event.

use sqlx::Row;

use super::batch::{V, delete_where_in, insert_rows};
use super::{PendingAck, Registry, RegistryError, clean, now};

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
        // A few set-based statements, not two per acknowledgement.
        let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
        delete_where_in(&mut tx, "DELETE FROM pending_acks WHERE id IN", &ids).await?;
        let events = acks
            .iter()
            .map(|ack| {
                vec![
                    V::T(Some(at.clone())),
                    V::T(Some(kind.to_owned())),
                    V::T(Some(mailbox_id.to_owned())),
                    V::T(Some(folder.to_owned())),
                    V::I(Some(i64::from(ack.uidvalidity))),
                    V::I(Some(i64::from(ack.uid))),
                    V::I(Some(ack.message_id)),
                    V::T(Some(clean(&ack.action))),
                ]
            })
            .collect();
        insert_rows(
            &mut tx,
            "events (at, kind, mailbox_id, folder, uidvalidity, uid, message_id, detail)",
            "",
            events,
            "append events",
        )
        .await?;
        tx.commit()
            .await
            .map_err(RegistryError::db("commit acks"))?;
        Ok(())
    }
}
