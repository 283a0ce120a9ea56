//! The audit log as a hash chain. Each record carries the hash of the one before it, over a
//! canonical encoding of its fields, so a record edited, inserted or removed in the database
//! no longer links with its neighbours. Removing the oldest records (retention) and marking
//! the head are both recorded as a [`Checkpoint`] that the server signs with its CA key: the
//! first record kept then links to a signed hash instead of to nothing, and a truncated tail
//! falls short of the newest checkpoint.
//!
//! What it does not do: store, fetch or sign. The store writes the chain, the server signs
//! checkpoints, and `flotilla audit verify` feeds what it downloaded to a [`Verifier`] with a
//! signature check of its own choosing.
//!
//! What it can and cannot show: someone who can write the database but does not hold the CA
//! key can rewrite records after the newest checkpoint and recompute every later hash, and can
//! delete head checkpoints (nothing links to them); that is caught only against a head noted
//! elsewhere, which the verifier prints and takes back as [`Verifier::expect`]. Every change
//! before a checkpoint still in the log, or before an expected head, is caught; so is a prefix
//! removed without a signed removal checkpoint.
//!
//! ```
//! use flotilla_audit::{Fields, Verifier, GENESIS, record_hash};
//!
//! let fields = Fields { seq: 1, at: 1_700_000_000_000, actor: "user:1", action: "auth.login",
//!     target: None, result: "success", detail: None };
//! let hash = record_hash(&fields, &GENESIS);
//! let mut verifier = Verifier::new(&[], |_, _| false).unwrap();
//! verifier.push(&fields, 7, &GENESIS, &hash).unwrap();
//! assert_eq!(verifier.finish().unwrap().last_seq, 1);
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// What the first record of the log links to.
pub const GENESIS: Hash = [0; 32];

const RECORD_DOMAIN: &[u8] = b"flotilla.audit.record.v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"flotilla.audit.checkpoint.v1\0";

/// The fields of one record that its hash covers: all of them but the database's row id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields<'a> {
    /// Position in the chain: 1, 2, 3, ... in the order records were committed.
    pub seq: u64,
    pub at: i64,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub result: &'a str,
    pub detail: Option<&'a str>,
}

/// The hash of a record whose predecessor's hash is `prev`. Every field is written with a
/// presence byte and its length, so no two different records encode alike.
pub fn record_hash(fields: &Fields<'_>, prev: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(fields.seq.to_be_bytes());
    h.update(fields.at.to_be_bytes());
    for field in [
        Some(fields.actor),
        Some(fields.action),
        fields.target,
        Some(fields.result),
        fields.detail,
    ] {
        match field {
            None => h.update([0u8]),
            Some(s) => {
                h.update([1u8]);
                h.update((s.len() as u64).to_be_bytes());
                h.update(s.as_bytes());
            }
        }
    }
    h.update(prev);
    h.finalize().into()
}

/// One audit record as the chain export carries it (`GET /api/admin/audit/chain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChainedRecord {
    pub seq: u64,
    /// The database's row id, to find the row; not covered by the hash.
    pub id: i64,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub result: String,
    pub detail: Option<String>,
    /// Hex of the previous record's hash ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// Hex of this record's hash.
    pub hash: String,
}

impl ChainedRecord {
    pub fn fields(&self) -> Fields<'_> {
        Fields {
            seq: self.seq,
            at: self.at,
            actor: &self.actor,
            action: &self.action,
            target: self.target.as_deref(),
            result: &self.result,
            detail: self.detail.as_deref(),
        }
    }
}

/// A signed statement that the chain held `hash` at `seq`, and that `removed` records up to
/// and including `seq` were deleted when it was made (0 when it only marks the head).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub at: i64,
    pub removed: u64,
    /// Hex of the CA key's signature over [`Checkpoint::statement`] (ECDSA P-256, DER).
    pub signature: String,
}

impl Checkpoint {
    /// The bytes that are signed.
    pub fn statement(seq: u64, hash: &Hash, at: i64, removed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 56);
        out.extend_from_slice(CHECKPOINT_DOMAIN);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(hash);
        out.extend_from_slice(&at.to_be_bytes());
        out.extend_from_slice(&removed.to_be_bytes());
        out
    }
}

/// A signature check for [`Verifier::new`]: ECDSA P-256 (DER) by the key whose
/// SubjectPublicKeyInfo is `spki_der` (the CA certificate's).
pub fn p256_signature_check(
    spki_der: &[u8],
) -> Result<impl Fn(&[u8], &[u8]) -> bool + use<>, String> {
    use p256::ecdsa::signature::Verifier as _;
    use p256::ecdsa::{Signature, VerifyingKey};
    use p256::pkcs8::DecodePublicKey;
    let key = VerifyingKey::from_public_key_der(spki_der)
        .map_err(|e| format!("the key is not ECDSA P-256: {e}"))?;
    Ok(move |statement: &[u8], signature: &[u8]| {
        Signature::from_der(signature).is_ok_and(|sig| key.verify(statement, &sig).is_ok())
    })
}

/// Hex of a hash, as the store keeps it.
pub fn to_hex(hash: &Hash) -> String {
    hex::encode(hash)
}

/// A hash from its hex; `None` unless it is 64 hex digits.
pub fn from_hex(s: &str) -> Option<Hash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Where the chain breaks, naming the first record (or checkpoint) that does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    #[error("checkpoint at seq {seq}: {why}")]
    Checkpoint { seq: u64, why: &'static str },
    #[error("record seq {seq} (row id {id}): {why}")]
    Record {
        seq: u64,
        id: i64,
        why: &'static str,
    },
    #[error(
        "the log ends at seq {last} but a signed checkpoint vouches for seq {checkpoint}: records were removed from its end"
    )]
    Truncated { last: u64, checkpoint: u64 },
}

/// What a verified chain holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    /// 0 when the log is empty.
    pub first_seq: u64,
    pub last_seq: u64,
    /// The hash of the last record: note it somewhere else to catch a rewritten tail later.
    pub head: Hash,
    pub checkpoints: usize,
}

/// A hash the chain must hold at a seq, and whether records up to it were removed (only a
/// removal lets the log start after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Anchor {
    hash: Hash,
    removal: bool,
}

/// Checks a chain fed record by record in seq order (so a large log streams through).
#[derive(Debug)]
pub struct Verifier {
    anchors: BTreeMap<u64, Anchor>,
    /// Seqs given to [`Verifier::expect`] not yet met in the records.
    expected: std::collections::BTreeSet<u64>,
    last: Option<(u64, Hash)>,
    first_seq: u64,
    records: u64,
}

impl Verifier {
    /// Starts with the checkpoints, each of whose signatures `signature_ok(statement,
    /// signature)` must accept.
    pub fn new(
        checkpoints: &[Checkpoint],
        signature_ok: impl Fn(&[u8], &[u8]) -> bool,
    ) -> Result<Verifier, Break> {
        let mut anchors = BTreeMap::new();
        for c in checkpoints {
            let bad = |why| Break::Checkpoint { seq: c.seq, why };
            let hash = from_hex(&c.hash).ok_or(bad("its hash is not 64 hex digits"))?;
            let signature =
                hex::decode(&c.signature).map_err(|_| bad("its signature is not hex"))?;
            if !signature_ok(
                &Checkpoint::statement(c.seq, &hash, c.at, c.removed),
                &signature,
            ) {
                return Err(bad("its signature does not verify with the CA key"));
            }
            let anchor = Anchor {
                hash,
                removal: c.removed > 0,
            };
            match anchors.insert(c.seq, anchor) {
                Some(a) if a.hash != hash => {
                    return Err(bad("two signed checkpoints give it different hashes"));
                }
                Some(a) if a.removal => {
                    anchors.insert(c.seq, a);
                }
                _ => {}
            }
        }
        Ok(Verifier {
            anchors,
            expected: Default::default(),
            last: None,
            first_seq: 0,
            records: 0,
        })
    }

    /// Adds a head the caller noted earlier (a [`Summary`]'s `last_seq` and `head`): the chain
    /// must still hold `hash` at `seq`. It is trusted as given, so it catches what a signed
    /// head catches even if that checkpoint was deleted since.
    pub fn expect(&mut self, seq: u64, hash: Hash) -> Result<(), Break> {
        if seq == 0 {
            // The empty log's head: nothing to hold.
            return Ok(());
        }
        let anchor = Anchor {
            hash,
            removal: false,
        };
        match self.anchors.get(&seq) {
            Some(a) if a.hash != hash => Err(Break::Checkpoint {
                seq,
                why: "the expected head differs from the signed checkpoint at its seq",
            }),
            Some(_) => {
                self.expected.insert(seq);
                Ok(())
            }
            None => {
                self.anchors.insert(seq, anchor);
                self.expected.insert(seq);
                Ok(())
            }
        }
    }

    /// Continues a chain known to hold `hash` at `seq` (checked before): the next record
    /// pushed must be `seq + 1` and link to it. What the server uses before it signs a head.
    pub fn continuing(seq: u64, hash: Hash) -> Verifier {
        Verifier {
            anchors: BTreeMap::new(),
            expected: Default::default(),
            last: (seq > 0).then_some((seq, hash)),
            first_seq: 0,
            records: 0,
        }
    }

    /// Checks the next record: `id` is its row id (to name it), `prev` and `hash` what the
    /// database holds for it.
    pub fn push(
        &mut self,
        fields: &Fields<'_>,
        id: i64,
        prev: &Hash,
        hash: &Hash,
    ) -> Result<(), Break> {
        let seq = fields.seq;
        let bad = |why| Break::Record { seq, id, why };
        match self.last {
            None => {
                let links_to = match seq.checked_sub(1) {
                    None => return Err(bad("its seq is 0")),
                    Some(0) => Some(GENESIS),
                    Some(before) => self
                        .anchors
                        .get(&before)
                        .filter(|a| a.removal)
                        .map(|a| a.hash),
                };
                match links_to {
                    None => {
                        return Err(bad(
                            "the records before it are missing and no signed checkpoint covers their removal",
                        ));
                    }
                    Some(expected) if expected != *prev => {
                        return Err(bad(
                            "it does not link to the signed checkpoint before it (a record or the checkpoint was altered)",
                        ));
                    }
                    Some(_) => {
                        // Linking to it proves an expected head there too.
                        if let Some(before) = seq.checked_sub(1) {
                            self.expected.remove(&before);
                        }
                    }
                }
            }
            Some((last_seq, last_hash)) => {
                if last_seq.checked_add(1) != Some(seq) {
                    return Err(bad("the records just before it are missing"));
                }
                if last_hash != *prev {
                    return Err(bad(
                        "it does not link to the record before it (that record's hash, or this link, was altered)",
                    ));
                }
            }
        }
        if record_hash(fields, prev) != *hash {
            return Err(bad(
                "its contents do not match its hash (the record was altered)",
            ));
        }
        if self.anchors.get(&seq).is_some_and(|a| a.hash != *hash) {
            return Err(bad(
                "its hash differs from the signed checkpoint at its seq",
            ));
        }
        if self.records == 0 {
            self.first_seq = seq;
        }
        self.expected.remove(&seq);
        self.last = Some((seq, *hash));
        self.records += 1;
        Ok(())
    }

    /// Checks a [`ChainedRecord`] as exported.
    pub fn push_record(&mut self, r: &ChainedRecord) -> Result<(), Break> {
        let bad = |why| Break::Record {
            seq: r.seq,
            id: r.id,
            why,
        };
        let prev = from_hex(&r.prev_hash).ok_or(bad("its previous hash is not 64 hex digits"))?;
        let hash = from_hex(&r.hash).ok_or(bad("its hash is not 64 hex digits"))?;
        self.push(&r.fields(), r.id, &prev, &hash)
    }

    /// Ends the check: the log must reach every checkpoint.
    pub fn finish(self) -> Result<Summary, Break> {
        let last = self.last.map_or(0, |(seq, _)| seq);
        if let Some((&checkpoint, _)) = self.anchors.last_key_value()
            && checkpoint > last
        {
            return Err(Break::Truncated { last, checkpoint });
        }
        // An expected head before the first record kept was not checked: say so rather than
        // pass it.
        if let Some(&seq) = self.expected.first() {
            return Err(Break::Checkpoint {
                seq,
                why: "the expected head is no longer in the log (removed by retention?): check it against your export and note the new head",
            });
        }
        Ok(Summary {
            records: self.records,
            first_seq: self.first_seq,
            last_seq: last,
            head: self.last.map_or(GENESIS, |(_, h)| h),
            checkpoints: self.anchors.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chain(n: u64) -> Vec<ChainedRecord> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let mut r = ChainedRecord {
                    seq,
                    id: seq as i64 + 100,
                    at: 1_000 + seq as i64,
                    actor: format!("user:{}", seq % 3),
                    action: "admin.device.block".into(),
                    target: (seq % 2 == 0).then(|| format!("dev-{seq}")),
                    result: "success".into(),
                    detail: None,
                    prev_hash: to_hex(&prev),
                    hash: String::new(),
                };
                let hash = record_hash(&r.fields(), &prev);
                r.hash = to_hex(&hash);
                prev = hash;
                r
            })
            .collect()
    }

    /// A test "signature": the statement's own SHA-256, so a changed statement fails.
    fn sign(statement: &[u8]) -> String {
        hex::encode(Sha256::digest(statement))
    }

    fn signature_ok(statement: &[u8], signature: &[u8]) -> bool {
        Sha256::digest(statement).as_slice() == signature
    }

    fn checkpoint_at(records: &[ChainedRecord], seq: u64, removed: u64) -> Checkpoint {
        let r = &records[seq as usize - 1];
        let hash = from_hex(&r.hash).unwrap();
        Checkpoint {
            seq,
            hash: r.hash.clone(),
            at: 5,
            removed,
            signature: sign(&Checkpoint::statement(seq, &hash, 5, removed)),
        }
    }

    fn verify(records: &[ChainedRecord], checkpoints: &[Checkpoint]) -> Result<Summary, Break> {
        let mut v = Verifier::new(checkpoints, signature_ok)?;
        for r in records {
            v.push_record(r)?;
        }
        v.finish()
    }

    /// The chain with every record from seq 6 on changed and every hash after recomputed, as
    /// someone with the database but not the CA key can.
    fn rewrite_from_seq_6(records: &[ChainedRecord]) -> Vec<ChainedRecord> {
        let mut rewritten = records.to_vec();
        let mut prev = from_hex(&rewritten[4].hash).unwrap();
        for r in rewritten[5..].iter_mut() {
            r.actor = "user:0".into();
            r.prev_hash = to_hex(&prev);
            let h = record_hash(&r.fields(), &prev);
            r.hash = to_hex(&h);
            prev = h;
        }
        rewritten
    }

    fn broken_at(result: Result<Summary, Break>) -> u64 {
        match result {
            Err(Break::Record { seq, .. }) | Err(Break::Checkpoint { seq, .. }) => seq,
            Err(Break::Truncated { last, .. }) => last,
            Ok(s) => panic!("the chain verified: {s:?}"),
        }
    }

    #[test]
    fn an_intact_chain_verifies_and_an_empty_one_too() {
        let records = chain(10);
        let s = verify(&records, &[]).unwrap();
        assert_eq!((s.records, s.first_seq, s.last_seq), (10, 1, 10));
        assert_eq!(to_hex(&s.head), records[9].hash);
        assert_eq!(verify(&[], &[]).unwrap().records, 0);
    }

    #[test]
    fn an_edited_record_fails_at_that_record() {
        let mut records = chain(10);
        records[4].detail = Some("nothing happened".into());
        assert_eq!(broken_at(verify(&records, &[])), 5);
        // Recomputing its hash moves the break to the next record, which still links to the
        // old one.
        let prev = from_hex(&records[4].prev_hash).unwrap();
        records[4].hash = to_hex(&record_hash(&records[4].fields(), &prev));
        assert_eq!(broken_at(verify(&records, &[])), 6);
    }

    #[test]
    fn a_removed_or_reordered_record_breaks_the_chain() {
        let mut records = chain(10);
        records.remove(3);
        assert_eq!(broken_at(verify(&records, &[])), 5);
        let mut records = chain(10);
        records.swap(2, 3);
        assert_eq!(broken_at(verify(&records, &[])), 4);
        // Without its first records and without a checkpoint, the log does not start.
        assert_eq!(broken_at(verify(&chain(10)[3..], &[])), 4);
    }

    #[test]
    fn a_signed_checkpoint_lets_the_log_start_after_removed_records() {
        let records = chain(10);
        let removal = checkpoint_at(&records, 4, 4);
        let s = verify(&records[4..], std::slice::from_ref(&removal)).unwrap();
        assert_eq!((s.first_seq, s.last_seq, s.checkpoints), (5, 10, 1));
        // A forged checkpoint (not signed) is refused ...
        let mut forged = removal.clone();
        forged.removed = 3;
        assert!(matches!(
            verify(&records[4..], &[forged]),
            Err(Break::Checkpoint { seq: 4, .. })
        ));
        // ... and one that names another hash does not link.
        let other = chain(10);
        let mut wrong = checkpoint_at(&other, 4, 4);
        wrong.hash = to_hex(&[9; 32]);
        wrong.signature = sign(&Checkpoint::statement(4, &[9; 32], 5, 4));
        assert_eq!(broken_at(verify(&records[4..], &[wrong])), 5);
    }

    #[test]
    fn a_head_checkpoint_does_not_let_the_log_start_after_it() {
        let records = chain(10);
        let head = checkpoint_at(&records, 4, 0);
        assert_eq!(broken_at(verify(&records[4..], &[head])), 5);
        // A removal and a head at the same seq: the removal counts, in either order.
        let removal = checkpoint_at(&records, 4, 4);
        let head = checkpoint_at(&records, 4, 0);
        for order in [[head.clone(), removal.clone()], [removal, head]] {
            assert_eq!(verify(&records[4..], &order).unwrap().first_seq, 5);
        }
    }

    #[test]
    fn an_expected_head_catches_a_rewritten_tail_whose_checkpoint_was_deleted() {
        let records = chain(10);
        let noted = verify(&records[..8], &[]).unwrap();
        let rewritten = rewrite_from_seq_6(&records);
        let check = |records: &[ChainedRecord]| {
            let mut v = Verifier::new(&[], signature_ok)?;
            v.expect(noted.last_seq, noted.head)?;
            for r in records {
                v.push_record(r)?;
            }
            v.finish()
        };
        assert_eq!(check(&records).unwrap().last_seq, 10);
        assert_eq!(broken_at(check(&rewritten)), 8);
        assert!(matches!(
            check(&records[..7]),
            Err(Break::Truncated { checkpoint: 8, .. })
        ));
    }

    #[test]
    fn an_expected_head_that_retention_removed_is_reported_not_passed() {
        let records = chain(10);
        let noted = verify(&records[..3], &[]).unwrap();
        let removal = checkpoint_at(&records, 4, 4);
        let mut v = Verifier::new(std::slice::from_ref(&removal), signature_ok).unwrap();
        v.expect(noted.last_seq, noted.head).unwrap();
        for r in &records[4..] {
            v.push_record(r).unwrap();
        }
        assert!(matches!(v.finish(), Err(Break::Checkpoint { seq: 3, .. })));
        // A head noted exactly where retention cut is proven by the link to its checkpoint.
        let at_cut = verify(&records[..4], &[]).unwrap();
        let mut v = Verifier::new(std::slice::from_ref(&removal), signature_ok).unwrap();
        v.expect(at_cut.last_seq, at_cut.head).unwrap();
        v.expect(0, GENESIS).unwrap();
        for r in &records[4..] {
            v.push_record(r).unwrap();
        }
        assert_eq!(v.finish().unwrap().first_seq, 5);
    }

    #[test]
    fn a_continuing_verifier_checks_only_what_follows_a_known_point() {
        let records = chain(10);
        let known = from_hex(&records[5].hash).unwrap();
        let mut v = Verifier::continuing(6, known);
        for r in &records[6..] {
            v.push_record(r).unwrap();
        }
        assert_eq!(v.finish().unwrap().last_seq, 10);
        let mut v = Verifier::continuing(6, known);
        assert!(
            v.push_record(&records[7]).is_err(),
            "a gap after the known point"
        );
        let mut v = Verifier::continuing(5, known);
        assert!(
            v.push_record(&records[6]).is_err(),
            "a link to another hash"
        );
    }

    #[test]
    fn a_seq_of_zero_is_a_break_not_a_panic() {
        let mut r = chain(1).remove(0);
        r.seq = 0;
        assert_eq!(broken_at(verify(&[r], &[])), 0);
    }

    #[test]
    fn a_head_checkpoint_catches_a_truncated_or_rewritten_tail() {
        let records = chain(10);
        let head = checkpoint_at(&records, 8, 0);
        assert!(matches!(
            verify(&records[..7], std::slice::from_ref(&head)),
            Err(Break::Truncated {
                last: 7,
                checkpoint: 8
            })
        ));
        // A tail rewritten from seq 6 on, every hash recomputed, still differs at seq 8.
        let rewritten = rewrite_from_seq_6(&records);
        assert_eq!(verify(&rewritten, &[]).unwrap().last_seq, 10);
        assert_eq!(broken_at(verify(&rewritten, &[head])), 8);
    }

    #[test]
    fn the_encoding_keeps_fields_apart() {
        let base = Fields {
            seq: 1,
            at: 2,
            actor: "ab",
            action: "c",
            target: None,
            result: "ok",
            detail: None,
        };
        let shifted = Fields {
            actor: "a",
            action: "bc",
            ..base
        };
        let empty_target = Fields {
            target: Some(""),
            ..base
        };
        let moved = Fields {
            target: None,
            detail: Some(""),
            ..empty_target
        };
        let hashes = [base, shifted, empty_target, moved].map(|f| record_hash(&f, &GENESIS));
        for (i, a) in hashes.iter().enumerate() {
            for b in &hashes[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    proptest! {
        #[test]
        fn any_single_field_change_is_caught(n in 2u64..30, victim in 0usize..30, field in 0u8..5, text in "\\PC{0,12}") {
            let mut records = chain(n);
            let victim = victim % n as usize;
            let before = records[victim].clone();
            let r = &mut records[victim];
            match field {
                0 => r.actor.push_str(&text),
                1 => r.at += 1,
                2 => r.target = Some(format!("x{text}")),
                3 => r.detail = Some(text.clone()),
                _ => r.result = format!("{}!", r.result),
            }
            prop_assume!(records[victim] != before);
            prop_assert_eq!(broken_at(verify(&records, &[])), victim as u64 + 1);
        }
    }
}
