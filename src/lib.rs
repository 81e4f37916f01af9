//! rpool's native module `rpool._rpool`: the module list and the exports, nothing else.

pub mod bindings;
pub mod board;
pub mod child;
pub mod forkserver;
pub mod frame;
pub mod job;
pub mod launch;
pub mod pool;
pub mod quick;
pub mod shm;
pub mod threads;

use pyo3::prelude::*;

#[pymodule]
fn _rpool(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<bindings::PoolCore>()?;
    m.add_class::<bindings::ApplyAsync>()?;
    m.add_class::<bindings::EarlyForkServer>()?;
    m.add_class::<bindings::PyJob>()?;
    m.add_class::<bindings::ItemQueue>()?;
    m.add_class::<bindings::ThreadCore>()?;
    m.add_class::<board::JobBoard>()?;
    m.add_function(wrap_pyfunction!(bindings::worker_main, m)?)?;
    m.add_function(wrap_pyfunction!(bindings::forkserver_main, m)?)?;
    m.add_function(wrap_pyfunction!(bindings::forward_log, m)?)?;
    m.add_function(wrap_pyfunction!(bindings::reset_log_cache, m)?)?;
    m.add_function(wrap_pyfunction!(shm::read_buffer, m)?)?;
    m.add_function(wrap_pyfunction!(shm::write_buffer, m)?)?;
    m.add_function(wrap_pyfunction!(shm::send_memfd, m)?)?;
    m.add_function(wrap_pyfunction!(quick::quick_dumps, m)?)?;
    m.add_function(wrap_pyfunction!(quick::quick_loads, m)?)?;
    Ok(())
}
