//! Flow records: one per denied flow, Hubble-shaped.
