//! Integration tests over a real socket: the management API, real GoTo clients, tenancy, bad input, callback
//! validation, the OpenAPI document, and the delivery engine.

#![allow(clippy::unwrap_used)]

mod bad_input;
mod callbacks;
mod cluster;
mod compat;
mod crash;
mod delivery;
mod lifecycle;
mod limits;
mod listen;
mod management;
mod openapi;
mod secrets;
mod store_contract;
mod support;
mod tenancy;
