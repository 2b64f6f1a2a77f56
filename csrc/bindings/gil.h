// The GIL released around native work, for the bindings of both extension modules.
#pragma once

#include <Python.h>

#include <chrono>
#include <thread>

namespace fusedrnn::bindings {

// py::gil_scoped_release, except for a thread taking the GIL back while the interpreter shuts down (a
// daemon thread still computing when the program ends). Before Python 3.14, PyEval_RestoreThread ends
// such a thread with pthread_exit, whose unwinding through a destructor (noexcept) calls std::terminate:
// the process would abort (SIGABRT) instead of exiting with its own status. Here that unwinding is
// caught and the thread waits, holding neither the GIL nor any lock, until the process ends, as Python
// 3.14 does itself. Nothing else is unwound: the thread's Python objects are never touched without the
// GIL.
class ReleasedGil {
 public:
  ReleasedGil() : state_(PyEval_SaveThread()) {}
  ReleasedGil(const ReleasedGil&) = delete;
  ReleasedGil& operator=(const ReleasedGil&) = delete;
  ~ReleasedGil() {
    try {
      PyEval_RestoreThread(state_);  // a C function: the one thing it can throw is that unwinding
    } catch (...) {
      for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
    }
  }

 private:
  PyThreadState* state_;
};

}  // namespace fusedrnn::bindings
