//! `stowix admin`.

#[derive(clap::Args, Debug)]
pub struct AdminArgs {}

pub fn run(_args: AdminArgs) -> i32 {
    todo!()
}
