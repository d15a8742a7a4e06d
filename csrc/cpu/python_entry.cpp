// flute._cpu as a Python module: its init, and `qgemm`, a direct Python entry to the dispatcher
// op flute::qgemm.
//
// Why: a call through `torch.ops.flute.qgemm` is boxed. The Python arguments become IValues by
// the schema, the dispatcher calls the kernels through their boxed wrappers, and the result goes
// back the same way. With the caches cold (a decoding model runs other ops between its linear
// layers), that path costs ~5-6 us more than a generated binding such as torch.add: 9.9-12.1
// against 4.0-5.3 us for `torch.ops.aten.add.Tensor` against `torch.add` on 16 floats, after a 4 MB
// sum (CPU_NOTES item 183), against one-row calls of 20-30 us on small layers. `qgemm` here does
// what a generated binding does: checks that each argument is a plain tensor or int, calls the
// same dispatcher op unboxed with the GIL released (so autograd, the profiler, dispatch modes,
// every backend and the Meta kernel work as through torch.ops), and wraps the result.
//
// Anything it does not handle goes to torch.ops.flute.qgemm unchanged (the `fallback` given to
// _init_direct): a torch function mode or a tensor subclass (both want __torch_function__),
// another argument count or type (SymInt, bool), and any C++ exception, so that errors reach
// Python as torch.ops raises them (the op has no side effects: it just runs again and fails
// again). Under torch.compile QuantLinear calls torch.ops.flute.qgemm itself.
//
// No pybind11 and only the CPython limited API, as for the rest of the module: torch's Python
// tensor type and wrapper come from libtorch_python by dlsym (it is loaded with torch, not linked
// here), and a tensor's at::Tensor is read where torch's THPVariable keeps it, checked once at
// _init_direct against an object torch wrapped. Without those symbols, or if the check fails,
// _init_direct returns False and flute calls torch.ops.flute.qgemm.
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/util/MaybeOwned.h>

#if defined(__linux__)
#include <dlfcn.h>
#endif

#include <optional>

#include "binding.h"

namespace {

using WrapFn = PyObject* (*)(at::TensorBase&&);

// libtorch_python's objects, found by _init_direct; wrap == nullptr: no direct entry.
struct TorchPython {
  PyObject** tensor_class = nullptr;     // THPVariableClass (torch.Tensor)
  PyObject** parameter_class = nullptr;  // ParameterClass (nn.Parameter: a plain tensor to C++)
  WrapFn wrap = nullptr;                 // THPVariable_Wrap(at::TensorBase&&)
  PyObject* fallback = nullptr;          // torch.ops.flute.qgemm.default
};
TorchPython tp;

// torch's THPVariable is {PyObject_HEAD; at::Tensor cdata; ...}: the tensor right after the head.
inline const at::Tensor& unpack(PyObject* o) {
  return *reinterpret_cast<const at::Tensor*>(reinterpret_cast<const char*>(o) + sizeof(PyObject));
}

// torch.Tensor or nn.Parameter exactly: subclasses may define __torch_function__.
inline bool plain_tensor(PyObject* o) {
  const PyObject* t = reinterpret_cast<const PyObject*>(Py_TYPE(o));
  return t == *tp.tensor_class || t == *tp.parameter_class;
}

// The optional offsets as an at::Tensor that borrows the caller's (no reference taken, none
// dropped: as binding.h's Weight borrows the op's tensors; a reference taken here would be held
// through the call).
struct BorrowedOptional {
  using Traits = c10::MaybeOwnedTraits<at::Tensor>;
  std::optional<at::Tensor> value;
  explicit BorrowedOptional(PyObject* o) {
    if (o != Py_None) value.emplace(Traits::createBorrow(unpack(o)));
  }
  ~BorrowedOptional() {
    if (value) Traits::destroyBorrow(*value);
  }
  BorrowedOptional(const BorrowedOptional&) = delete;
  BorrowedOptional& operator=(const BorrowedOptional&) = delete;
};

PyObject* call_fallback(PyObject* const* args, Py_ssize_t n) {
  if (tp.fallback == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "flute._cpu.qgemm: _init_direct was not called");
    return nullptr;
  }
  PyObject* tuple = PyTuple_New(n);
  if (tuple == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    Py_INCREF(args[i]);
    PyTuple_SetItem(tuple, i, args[i]);  // steals the reference
  }
  PyObject* out = PyObject_Call(tp.fallback, tuple, nullptr);
  Py_DECREF(tuple);
  return out;
}

// qgemm(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features)
PyObject* qgemm_direct(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (tp.wrap == nullptr || n != 9 || at::impl::torch_function_mode_enabled()) return call_fallback(args, n);
  if (!plain_tensor(args[0]) || !plain_tensor(args[1]) || !plain_tensor(args[2]) ||
      !(args[3] == Py_None || plain_tensor(args[3])) || !plain_tensor(args[4]))
    return call_fallback(args, n);
  int64_t dims[4];
  for (int i = 0; i < 4; ++i) {
    PyObject* o = args[5 + i];
    if (!PyLong_CheckExact(o)) return call_fallback(args, n);
    dims[i] = PyLong_AsLongLong(o);
    if (dims[i] == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return call_fallback(args, n);
    }
  }
  const BorrowedOptional offsets(args[3]);
  at::Tensor y;
  bool failed = false;
  PyThreadState* ts = PyEval_SaveThread();  // as torch's bindings: no GIL while the op runs
  try {
    y = flute_cpu::binding::qgemm_handle().call(unpack(args[0]), unpack(args[1]), unpack(args[2]), offsets.value,
                                                unpack(args[4]), dims[0], dims[1], dims[2], dims[3]);
  } catch (...) {
    failed = true;
  }
  PyEval_RestoreThread(ts);
  if (failed) return call_fallback(args, n);  // raises the op's error as torch.ops.flute.qgemm does
  return tp.wrap(std::move(y));
}

// _init_direct(fallback) -> bool: keep `fallback` (torch.ops.flute.qgemm.default) and find torch's
// Python tensor objects; True where `qgemm` runs the op directly.
PyObject* init_direct(PyObject*, PyObject* const* args, Py_ssize_t n) {
  if (n != 1) {
    PyErr_SetString(PyExc_TypeError, "flute._cpu._init_direct(fallback) takes one argument");
    return nullptr;
  }
  Py_INCREF(args[0]);
  Py_XDECREF(tp.fallback);
  tp.fallback = args[0];
  tp.wrap = nullptr;
#if defined(__linux__)
  void* lib = dlopen("libtorch_python.so", RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) Py_RETURN_FALSE;
  auto* tensor_class = static_cast<PyObject**>(dlsym(lib, "THPVariableClass"));
  auto* parameter_class = static_cast<PyObject**>(dlsym(lib, "ParameterClass"));
  auto wrap = reinterpret_cast<WrapFn>(dlsym(lib, "_Z16THPVariable_WrapON2at10TensorBaseE"));
  dlclose(lib);  // still loaded by torch (RTLD_NOLOAD took one more reference)
  if (tensor_class == nullptr || parameter_class == nullptr || wrap == nullptr || *tensor_class == nullptr)
    Py_RETURN_FALSE;
  // The layout check: a tensor torch wrapped must be a torch.Tensor whose at::Tensor sits where
  // unpack() reads it (compared as a pointer: nothing is dereferenced if the layout differs).
  at::Tensor probe = at::empty({1});
  const void* impl = probe.unsafeGetTensorImpl();
  PyObject* o = wrap(at::TensorBase(probe));
  if (o == nullptr) {
    PyErr_Clear();
    Py_RETURN_FALSE;
  }
  const bool same = reinterpret_cast<PyObject*>(Py_TYPE(o)) == *tensor_class &&
                    *reinterpret_cast<void* const*>(reinterpret_cast<const char*>(o) + sizeof(PyObject)) == impl;
  Py_DECREF(o);
  if (!same) Py_RETURN_FALSE;
  tp.tensor_class = tensor_class;
  tp.parameter_class = parameter_class;
  tp.wrap = wrap;
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"qgemm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&qgemm_direct)), METH_FASTCALL,
     "qgemm(x, qweight, scales, offsets, table, bits, group_size, in_features, out_features): "
     "torch.ops.flute.qgemm called directly (see csrc/cpu/python_entry.cpp)"},
    {"_init_direct", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&init_direct)), METH_FASTCALL,
     "_init_direct(fallback) -> bool: whether qgemm runs the op directly on this torch"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// The registrations (binding.cpp's TORCH_LIBRARY blocks) run when the library loads; the module
// object carries the direct entry.
PyMODINIT_FUNC PyInit__cpu(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_cpu", "flute CPU lookup-table kernels", -1,
                            methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
