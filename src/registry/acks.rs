//! Pending acknowledgements: rows written with the registration, performed on the server by
//! the IMAP side, then deleted here together with an `acked` event.

use sqlx::Row;

use super::batch::{V, append_events, delete_where_in, insert_rows};
use super::{PendingAck, Registry, RegistryError, clean, now};

/// How often the acknowledgement of one location is repeated (see [`Registry::requeue_acks`]).
pub const MAX_ACK_REPEATS: u32 = 3;

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

    /// Queues the acknowledgement again for messages recorded at these locations that the
    /// server still shows unseen: an acknowledgement lost on the server's side (it answered OK
    /// and kept the old flags, or lost them in a restart) is repeated, not left undone for good.
    /// `ack` applies to registered records, `quarantine_ack` to quarantined ones (`None`: not
    /// repeated). A location is repeated at most [`MAX_ACK_REPEATS`] times; the UIDs past that
    /// are returned for the caller to report. Returns (queued, given up).
    pub async fn requeue_acks(
        &self,
        mailbox_id: &str,
        folder: &str,
        uidvalidity: u32,
        uids: &[u32],
        ack: Option<&str>,
        quarantine_ack: Option<&str>,
    ) -> Result<(usize, Vec<u32>), RegistryError> {
        let (Some(lo), Some(hi)) = (uids.iter().min(), uids.iter().max()) else {
            return Ok((0, Vec::new()));
        };
        let mut tx = self.begin_write().await?;
        let rows = sqlx::query(
            "SELECT l.uid, l.message_id, m.status, \
             (SELECT COUNT(*) FROM events e WHERE e.message_id = l.message_id \
                 AND e.kind = 'ack-repeated' AND e.mailbox_id = l.mailbox_id \
                 AND e.folder = l.folder AND e.uidvalidity = l.uidvalidity AND e.uid = l.uid) \
             FROM message_locations l \
             JOIN messages m ON m.id = l.message_id \
             WHERE l.mailbox_id = $1 AND l.folder = $2 AND l.uidvalidity = $3 \
             AND l.uid >= $4 AND l.uid <= $5 \
             AND NOT EXISTS (SELECT 1 FROM pending_acks p WHERE p.mailbox_id = l.mailbox_id \
                 AND p.folder = l.folder AND p.uidvalidity = l.uidvalidity AND p.uid = l.uid)",
        )
        .bind(mailbox_id)
        .bind(folder)
        .bind(i64::from(uidvalidity))
        .bind(i64::from(*lo))
        .bind(i64::from(*hi))
        .fetch_all(&mut *tx)
        .await
        .map_err(RegistryError::db("look up acknowledgements to repeat"))?;
        let wanted: std::collections::HashSet<u32> = uids.iter().copied().collect();
        let mut again: Vec<(u32, i64, &str)> = Vec::new();
        let mut given_up = Vec::new();
        for r in &rows {
            let uid = r.get::<i64, _>(0) as u32;
            let action = match r.get::<String, _>(2).as_str() {
                "registered" => ack,
                _ => quarantine_ack,
            };
            let (Some(action), true) = (action, wanted.contains(&uid)) else {
                continue;
            };
            if r.get::<i64, _>(3) >= i64::from(MAX_ACK_REPEATS) {
                given_up.push(uid);
            } else {
                again.push((uid, r.get::<i64, _>(1), action));
            }
        }
        if again.is_empty() {
            return Ok((0, given_up));
        }
        let at = now();
        let mut pending = Vec::with_capacity(again.len());
        let mut events = Vec::with_capacity(again.len());
        for (uid, message_id, action) in &again {
            pending.push(vec![
                V::T(Some(mailbox_id.to_owned())),
                V::T(Some(folder.to_owned())),
                V::I(Some(i64::from(uidvalidity))),
                V::I(Some(i64::from(*uid))),
                V::T(Some((*action).to_owned())),
                V::I(Some(*message_id)),
                V::T(Some(at.clone())),
            ]);
            events.push(ack_event(
                &at,
                "ack-repeated",
                (mailbox_id, folder, uidvalidity, *uid),
                *message_id,
                &format!("{action}: recorded, but the server still offers it"),
            ));
        }
        insert_rows(
            &mut tx,
            self.backend,
            "pending_acks (mailbox_id, folder, uidvalidity, uid, action, message_id, created_at)",
            "ON CONFLICT (mailbox_id, folder, uidvalidity, uid) DO NOTHING",
            pending,
            "queue acknowledgements again",
        )
        .await?;
        append_events(&mut tx, self.backend, events).await?;
        tx.commit()
            .await
            .map_err(RegistryError::db("commit repeated acknowledgements"))?;
        Ok((again.len(), given_up))
    }

    /// Deletes acknowledgements the server confirmed (`kind` = `acked`) or that can no longer
    /// apply (`ack-dropped`), each with its audit event dated when it was confirmed: groups of
    /// (kind, when, acknowledgements), in one transaction.
    pub async fn acks_done(
        &self,
        mailbox_id: &str,
        folder: &str,
        groups: &[(&str, &str, &[PendingAck])],
    ) -> Result<(), RegistryError> {
        if groups.iter().all(|(_, _, acks)| acks.is_empty()) {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        // A few set-based statements, not two per acknowledgement.
        let ids: Vec<i64> = groups
            .iter()
            .flat_map(|(_, _, acks)| acks.iter().map(|a| a.id))
            .collect();
        delete_where_in(
            &mut tx,
            self.backend,
            "DELETE FROM pending_acks WHERE id IN",
            &ids,
        )
        .await?;
        let events = groups
            .iter()
            .flat_map(|(kind, at, acks)| {
                acks.iter().map(move |ack| {
                    ack_event(
                        at,
                        kind,
                        (mailbox_id, folder, ack.uidvalidity, ack.uid),
                        ack.message_id,
                        &ack.action,
                    )
                })
            })
            .collect();
        append_events(&mut tx, self.backend, events).await?;
        tx.commit()
            .await
            .map_err(RegistryError::db("commit acks"))?;
        Ok(())
    }
}

/// The audit event of an acknowledgement at (mailbox, folder, UIDVALIDITY, UID).
fn ack_event(
    at: &str,
    kind: &str,
    (mailbox_id, folder, uidvalidity, uid): (&str, &str, u32, u32),
    message_id: i64,
    detail: &str,
) -> Vec<V> {
    vec![
        V::T(Some(at.to_owned())),
        V::T(Some(kind.to_owned())),
        V::T(Some(mailbox_id.to_owned())),
        V::T(Some(folder.to_owned())),
        V::I(Some(i64::from(uidvalidity))),
        V::I(Some(i64::from(uid))),
        V::I(Some(message_id)),
        V::T(Some(clean(detail))),
    ]
}
