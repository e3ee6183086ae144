//! The OpenMLS provider a channel runs on: RustCrypto for the primitives and
//! OpenMLS's key-value memory storage, whose rows the SDK keeps in the device's
//! SQLite file.
//!
//! The storage is loaded from the rows a transaction read, the channel works on
//! it, and [`MlsProvider::changes`] hands back exactly the rows that changed, so
//! the caller writes them in the same transaction as the cursor, outbox and
//! inbox. Nothing of a group ever lives in a second database.

use std::collections::HashMap;

use openmls::prelude::OpenMlsProvider;
use openmls_memory_storage::MemoryStorage;
use openmls_rust_crypto::RustCrypto;

/// One storage row: key and value, both opaque OpenMLS encodings.
pub type Row = (Vec<u8>, Vec<u8>);

/// What a change did to the storage since it was loaded.
#[derive(Debug, Default)]
pub struct StorageChanges {
    /// Rows written or overwritten.
    pub upserts: Vec<Row>,
    /// Keys deleted.
    pub deletes: Vec<Vec<u8>>,
}

impl StorageChanges {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }
}

/// RustCrypto + memory storage, with a snapshot of the rows as loaded.
pub struct MlsProvider {
    crypto: RustCrypto,
    storage: MemoryStorage,
    /// The rows as they were loaded or last taken by [`changes`](Self::changes).
    loaded: HashMap<Vec<u8>, Vec<u8>>,
}

impl MlsProvider {
    /// A provider over the given rows.
    pub fn load(rows: impl IntoIterator<Item = Row>) -> Self {
        let loaded: HashMap<_, _> = rows.into_iter().collect();
        let storage = MemoryStorage::default();
        *storage.values.write().unwrap_or_else(|e| e.into_inner()) = loaded.clone();
        Self {
            crypto: RustCrypto::default(),
            storage,
            loaded,
        }
    }

    /// A row of khub's own beside OpenMLS's (under a key OpenMLS never uses).
    pub fn get_extra(&self, key: &[u8]) -> Option<Vec<u8>> {
        let values = self
            .storage
            .values
            .read()
            .unwrap_or_else(|e| e.into_inner());
        values.get(key).cloned()
    }

    /// Sets (or, with `None`, deletes) a row of khub's own.
    pub fn set_extra(&self, key: &[u8], value: Option<Vec<u8>>) {
        let mut values = self
            .storage
            .values
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match value {
            Some(value) => values.insert(key.to_vec(), value),
            None => values.remove(key),
        };
    }

    /// The keys of khub's own rows that start with `prefix`.
    pub fn extra_keys(&self, prefix: &[u8]) -> Vec<Vec<u8>> {
        let values = self
            .storage
            .values
            .read()
            .unwrap_or_else(|e| e.into_inner());
        values
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Every row but those whose key starts with `except`, encoded as `(u32
    /// key length, key, u32 value length, value)*`: a snapshot another
    /// provider can load.
    pub fn snapshot(&self, except: &[u8]) -> Vec<u8> {
        let values = self
            .storage
            .values
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (key, value) in values.iter().filter(|(k, _)| !k.starts_with(except)) {
            for part in [key, value] {
                let len = u32::try_from(part.len()).expect("storage rows are far below 4 GiB");
                out.extend_from_slice(&len.to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        out
    }

    /// A provider over the rows of a [`snapshot`](Self::snapshot), or `None`
    /// if it is damaged.
    pub fn from_snapshot(mut bytes: &[u8]) -> Option<Self> {
        let mut rows = Vec::new();
        let take = |bytes: &mut &[u8]| -> Option<Vec<u8>> {
            let (len, rest) = bytes.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
            let part = rest.get(..len)?.to_vec();
            *bytes = &rest[len..];
            Some(part)
        };
        while !bytes.is_empty() {
            let key = take(&mut bytes)?;
            let value = take(&mut bytes)?;
            rows.push((key, value));
        }
        Some(Self::load(rows))
    }

    /// The rows written and deleted since the last call (or the load).
    pub fn changes(&mut self) -> StorageChanges {
        let now = self
            .storage
            .values
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut changes = StorageChanges::default();
        for (key, value) in &now {
            if self.loaded.get(key) != Some(value) {
                changes.upserts.push((key.clone(), value.clone()));
            }
        }
        for key in self.loaded.keys() {
            if !now.contains_key(key) {
                changes.deletes.push(key.clone());
            }
        }
        self.loaded = now;
        changes
    }

    /// Every row as it is now.
    #[cfg(feature = "testing")]
    pub(crate) fn rows(&self) -> Vec<Row> {
        let values = self
            .storage
            .values
            .read()
            .unwrap_or_else(|e| e.into_inner());
        values.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl OpenMlsProvider for MlsProvider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = MemoryStorage;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}
