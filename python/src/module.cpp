// zo2._zo2: the Python binding (pybind11). The pure-Python package zo2/ re-exports it.
//
// Note [Binding]: the model/session surface is bound over the C API (include/zo2.h), not
// over the C++ Session (api/session.h). The C API is the contract zo2 promises to host
// programs: it validates every argument (api/options.h, the one validation layer the CLI
// shares), keeps an invalid argument from changing a session, poisons a session after a
// device failure, and reports every failure as a status code with a message. Binding it
// means Python gets exactly that contract, with one exception class per status code
// (zo2/_errors.py), instead of a second, diverging one written against C++ internals that
// may change. The C API has no tokenizer and no `train` loop, so two parts use C++ directly:
//   - zo2.Tokenizer wraps models/tokenizer.h (immutable, thread-safe; what zo2-tune uses);
//   - zo2.train runs zo2-tune's own `train` subcommand (tools/cmd_train.cpp, add_train) in
//     this process, with its flags built from the keyword arguments: the same parsing,
//     validation, data reading, run directory, resume and signal handling as the CLI, so
//     `zo2.train` and `zo2-tune train` cannot drift apart. Its progress reaches Python
//     through train's --log-json records, written (its hidden --records PATH) into a pipe
//     this module reads; a log_json= keyword is train's own --log-json, checked as the CLI's.
// The binding adds only what Python needs: array conversion (zero-copy for C-contiguous
// int32), the GIL released during every call that runs the model or reads files, a
// per-session mutex (the C API forbids concurrent use of one session; Python threads get
// serialized instead of undefined behaviour), and Ctrl-C checks between steps.
#include "zo2.h"

#include "api/generate.h"
#include "api/options.h"
#include "api/run_dir.h"
#include "api/status.h"
#include "models/tokenizer.h"
#include "runtime/error.h"
#include "runtime/log.h"
#include "tools/cli.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cxxabi.h>
#include <fcntl.h>
#include <locale.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

// ---------------------------------------------------------------------------------------
// Note [The GIL at exit]: a zo2 call releases the GIL (NoGil) and takes it back when it
// returns. A daemon thread whose call returns after the interpreter began finalizing (the
// script ended while it trained) may not have it back: CPython 3.11-3.13 end such a thread
// in PyEval_RestoreThread with pthread_exit, whose forced unwind cannot pass a noexcept
// frame (pybind11's gil_scoped_release destructor): std::terminate, and the process aborts
// at exit (adversarial pass 65). NoGil instead parks that thread forever, as CPython 3.14
// does itself: it holds no session's lock by then (each is declared after the NoGil it runs
// under, so released first) and goes with the process. (One parked inside zo2.train keeps
// that function's process-wide lock and leaves its zo2-tune child to the process's end: a
// zo2.train from an atexit handler would then wait; none is made at exit.) The thread that finalizes (the main
// thread, where an object's __del__ may still call zo2) takes the GIL back as usual. The
// check cannot see a finalization that starts while the thread waits for the GIL inside
// PyEval_RestoreThread: that pthread_exit's forced unwind is caught there and the thread
// parked too (a handler that never returns; leaving it without rethrowing would abort).

unsigned long g_main_thread = 0;  // threading.main_thread().ident, set at import

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

class NoGil {
 public:
  NoGil() : state_(PyEval_SaveThread()) {}
  NoGil(const NoGil&) = delete;
  NoGil& operator=(const NoGil&) = delete;
  ~NoGil() {
    if (PyThread_get_thread_ident() != g_main_thread && interpreter_finalizing()) park();
    try {
      PyEval_RestoreThread(state_);
    } catch (abi::__forced_unwind&) {
      park();
    }
  }

 private:
  [[noreturn]] static void park() {
    for (;;) std::this_thread::sleep_for(std::chrono::hours(24));
  }
  PyThreadState* state_;
};

// ---------------------------------------------------------------------------------------
// Errors: a class per status code, defined in zo2/_errors.py.

py::object error_class(int code) {
  static py::object* by_status = nullptr;  // leaked on purpose: lives as long as the interpreter
  if (!by_status) by_status = new py::object(py::module_::import("zo2._errors").attr("_BY_STATUS"));
  py::object key = py::int_(code);
  if (by_status->contains(key)) return (*by_status)[key];
  return (*by_status)[py::int_(static_cast<int>(ZO2_ERR_INTERNAL))];
}

// A message as Python text: zo2's messages are UTF-8 except the bytes of a path that is not
// (b"/data/\xff"), which read as the escape "\xff" instead of failing the whole message.
py::str message_text(const std::string& message) {
  PyObject* u = PyUnicode_DecodeUTF8(message.data(), static_cast<Py_ssize_t>(message.size()), "backslashreplace");
  if (!u) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(u);
}

// A path zo2 holds (bytes, as the OS spells it) as os.fsdecode returns it: a str that
// os.fsencode turns back into the same bytes (surrogateescape for non-UTF-8 bytes).
py::str fs_text(const std::string& path) {
  PyObject* u = PyUnicode_DecodeFSDefaultAndSize(path.data(), static_cast<Py_ssize_t>(path.size()));
  if (!u) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(u);
}

[[noreturn]] void raise_status(int code, const std::string& message) {
  py::object cls = error_class(code);
  PyErr_SetObject(cls.ptr(), message_text(message).ptr());
  throw py::error_already_set();
}

using zo2::status_of;  // api/status.h: the C API's code of each error kind

// Runs a C++ body (GIL released) and turns what it throws into zo2's exception classes.
template <class F>
auto cxx_call(F&& f) -> decltype(f()) {
  int code = 0;
  std::string message;
  {
    NoGil nogil;
    try {
      return f();
    } catch (const zo2::Error& e) {
      code = status_of(e.kind()), message = e.what();
    } catch (const std::exception& e) {  // api/status.h (a refused TBB thread: Note [Thread limits])
      zo2::ExceptionStatus st = zo2::status_of_exception(e);
      code = st.code, message = std::move(st.message);
    }
  }
  raise_status(code, message);
}

// Raises KeyboardInterrupt (or what a signal handler raised) when a signal arrived: called
// with the GIL held after every step, so Ctrl-C stops a step loop between steps, with the
// step that was running completed and counted.
void check_signals() {
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

[[noreturn]] void invalid(const std::string& message) { raise_status(ZO2_ERR_INVALID_ARGUMENT, message); }

// An argument of the wrong type: zo2.InvalidTypeError, a TypeError that is also an
// InvalidArgumentError (zo2/_errors.py).
[[noreturn]] void wrong_type(const std::string& message) {
  static py::object* cls = nullptr;  // leaked on purpose, as error_class's table
  if (!cls) cls = new py::object(py::module_::import("zo2._errors").attr("InvalidTypeError"));
  PyErr_SetObject(cls->ptr(), message_text(message).ptr());
  throw py::error_already_set();
}

// The name of v's type, for messages: "int", "NoneType", "numpy.ndarray".
std::string type_name(py::handle v) {
  py::handle t = reinterpret_cast<PyObject*>(Py_TYPE(v.ptr()));
  const std::string mod = py::str(t.attr("__module__")).cast<std::string>();
  const std::string name = py::str(t.attr("__qualname__")).cast<std::string>();
  return mod == "builtins" ? name : mod + "." + name;
}

// A C string zo2 passes on: a NUL inside would cut it short without a word.
void check_no_nul(const std::string& s, const char* name) {
  if (s.find('\0') != std::string::npos)
    invalid(std::string(name) + " contains a NUL character");
}

// str, bytes or os.PathLike, as the OS spells it: os.fsencode (a bytes path is not "b'...'").
std::string path_string(py::handle h, const char* name) {
  if (!(py::isinstance<py::str>(h) || py::isinstance<py::bytes>(h) || py::hasattr(h, "__fspath__")))
    wrong_type(std::string(name) + " must be a path (str, bytes or os.PathLike), not " + type_name(h));
  std::string s = py::bytes(py::module_::import("os").attr("fsencode")(h)).cast<std::string>();
  check_no_nul(s, name);
  if (s.empty()) invalid(std::string(name) + " is empty");
  return s;
}

// ---------------------------------------------------------------------------------------
// Arrays: token ids, masks and labels as int32 [n_seq, n_tokens].

// An int32 view of `obj` (numpy array, PyTorch CPU tensor, anything with __array__, nested
// lists): the array itself when it is C-contiguous int32 (no copy), else a checked copy.
struct IntMatrix {
  py::object keep;            // the array whose memory `data` points into
  std::vector<int32_t> copy;  // used when a conversion was needed
  const int32_t* data = nullptr;
  py::ssize_t rows = 0, cols = 0;
  py::ssize_t ndim = 2;  // as given: [n_tokens] is 1 (rows 1), for messages
};

// "[2, 16]" or "[16]": a matrix's shape as the caller passed it.
std::string shape_text(const IntMatrix& m) {
  return m.ndim == 1 ? "[" + std::to_string(m.cols) + "]"
                     : "[" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "]";
}

// What an integer argument holds, for messages: token ids (and their masks and labels), or
// a list of other integers (group_sizes: "group sizes are integers", shape "[n_groups]").
struct IntKind {
  const char* values = "token ids, masks and labels are integers";
  const char* shapes = "[n_seq, n_tokens] or [n_tokens]";
};

py::object as_array_source(py::handle obj, const char* name) {
  // PyTorch: refuse device tensors with a clear message; detach (ids never need grad).
  if (py::hasattr(obj, "device") && py::hasattr(obj, "detach") && !py::isinstance<py::array>(obj)) {
    py::object dev = obj.attr("device");
    if (py::hasattr(dev, "type") && py::str(dev.attr("type")).cast<std::string>() != "cpu")
      invalid(std::string(name) + " is a tensor on " + py::str(dev).cast<std::string>() +
              ": zo2 takes host memory (call .cpu() first; the session moves the batch to its device)");
    return obj.attr("detach")();
  }
  return py::reinterpret_borrow<py::object>(obj);
}

IntMatrix int_matrix(py::handle obj, const char* name, bool allow_bool, bool allow_empty = false, IntKind what = {}) {
  IntMatrix m;
  auto not_integers = [&]() {
    const std::string t = type_name(obj);
    wrong_type(std::string(name) + ": " +
               (obj.is_none() ? std::string("None") : (std::string("aeiou").find(t[0]) != std::string::npos ? "an " : "a ") + t) +
               " is not an array of integers");
  };
  // Bytes are text, not ids: bytes read as dtype |S, and a bytearray would read as uint8 ids
  // (numpy takes its buffer), so both are refused alike (np.frombuffer for byte values).
  if (py::isinstance<py::bytes>(obj) || PyByteArray_Check(obj.ptr()))
    wrong_type(std::string(name) + " is a " + type_name(obj) + ", not an array of integers (" + what.values +
               "; np.frombuffer(b, np.uint8) reads bytes as values)");
  py::object src = as_array_source(obj, name);
  py::array a = py::array::ensure(src);
  if (!a) {
    PyErr_Clear();
    not_integers();
  }
  // numpy wraps what is no array (None, a generator, a dict, ragged or mixed lists) in an
  // object array: say what was passed, not "dtype object". (An object ndarray passed as
  // such is named by its dtype below.)
  if (a.dtype().kind() == 'O' && !py::isinstance<py::array>(src)) not_integers();
  if (a.size() == 0) {  // [] reads as float64 to numpy: "dtype float64" would mislead
    if (!allow_empty) invalid(std::string(name) + " is empty: no token ids");
    m.rows = 1, m.ndim = a.ndim();
    return m;
  }
  const char kind = a.dtype().kind();
  if (!(kind == 'i' || kind == 'u' || (allow_bool && kind == 'b')))
    wrong_type(std::string(name) + " has dtype " + py::str(a.dtype()).cast<std::string>() + ": " + what.values);
  m.ndim = a.ndim();
  if (a.ndim() == 1) {
    m.rows = 1, m.cols = a.shape(0);
  } else if (a.ndim() == 2) {
    m.rows = a.shape(0), m.cols = a.shape(1);
  } else {
    invalid(std::string(name) + " has " + std::to_string(a.ndim()) + " dimensions; expected " + what.shapes);
  }
  if (m.rows > std::numeric_limits<int32_t>::max() || m.cols > std::numeric_limits<int32_t>::max())
    invalid(std::string(name) + ": too many rows or columns");
  using I32 = py::array_t<int32_t, py::array::c_style>;
  // Native byte order only: a big-endian '>i4' array read as int32 would be other ids.
  const bool native = a.dtype().attr("isnative").cast<bool>();
  if (kind == 'i' && a.itemsize() == 4 && native && (a.flags() & py::array::c_style)) {
    I32 v = py::reinterpret_borrow<I32>(a);
    m.data = v.data();
    m.keep = std::move(v);
    return m;
  }
  // Any other integer type or layout: through int64, checking each value fits an int32 (a
  // silent wrap-around would turn a bad id into a valid one).
  using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
  I64 wide = I64::ensure(a);
  if (!wide) throw py::error_already_set();
  if (kind == 'u' && a.itemsize() == 8) {
    // uint64 above 2^63 would read as negative int64: check the unsigned values.
    py::array_t<uint64_t, py::array::c_style | py::array::forcecast> u(a);
    for (py::ssize_t i = 0; i < u.size(); ++i)
      if (u.data()[i] > static_cast<uint64_t>(std::numeric_limits<int32_t>::max()))
        invalid(std::string(name) + " holds " + std::to_string(u.data()[i]) + ", outside int32");
  }
  m.copy.resize(static_cast<size_t>(wide.size()));
  for (py::ssize_t i = 0; i < wide.size(); ++i) {
    const int64_t v = wide.data()[i];
    if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
      invalid(std::string(name) + " holds " + std::to_string(v) + ", outside int32");
    m.copy[static_cast<size_t>(i)] = static_cast<int32_t>(v);
  }
  m.data = m.copy.data();
  return m;
}

struct Batch {
  IntMatrix ids, mask, labels;
  zo2_batch b{};
};

Batch make_batch(py::handle input_ids, py::handle attention_mask, py::handle labels) {
  Batch out;
  out.ids = int_matrix(input_ids, "input_ids", false);
  auto same_shape = [&](const IntMatrix& m, const char* name) {
    if (m.rows != out.ids.rows || m.cols != out.ids.cols)
      invalid(std::string(name) + " has shape " + shape_text(m) + " but input_ids has " + shape_text(out.ids));
  };
  if (!attention_mask.is_none()) {
    out.mask = int_matrix(attention_mask, "attention_mask", true);
    same_shape(out.mask, "attention_mask");
  }
  if (!labels.is_none()) {
    out.labels = int_matrix(labels, "labels", false);
    same_shape(out.labels, "labels");
  }
  out.b.n_seq = static_cast<int32_t>(out.ids.rows);
  out.b.n_tokens = static_cast<int32_t>(out.ids.cols);
  out.b.tokens = out.ids.data;
  out.b.attention_mask = out.mask.data;
  out.b.labels = out.labels.data;
  return out;
}

// One sequence of integers: [n] (token ids; a [1, n] row is taken as it too), or with
// `strict` exactly 1-D (group_sizes: [[2, 2]] is not two groups).
std::vector<int32_t> int_list(py::handle obj, const char* name, IntKind what = {"token ids are integers", "[n_tokens]"},
                              bool strict = false) {
  IntMatrix m = int_matrix(obj, name, false, /*allow_empty=*/true, what);
  if (m.rows != 1 || (strict && m.ndim != 1))
    invalid(std::string(name) + " must be one-dimensional (" + what.shapes + "), not of shape " + shape_text(m));
  return std::vector<int32_t>(m.data, m.data + m.cols);
}

// ---------------------------------------------------------------------------------------
// Model

// Note [A model's lifetime]: Session(model) and zo2.plan(model) pass the handle to the C
// API with the GIL released, so another thread may call Model.close() (or leave its `with`)
// meanwhile (adversarial pass 70: zo2_session_init read the freed zo2_model). The handle is
// shared: such a call takes its own reference, with the GIL held, before releasing the GIL,
// and close() drops only the Model's. close() never waits; the zo2_model is freed when the
// last call using it returns. (Every copy and release of the shared_ptr happens with the GIL
// held, as close() does, so the handle itself is never read while it changes.)
struct Model {
  std::shared_ptr<zo2_model> m;
  std::string path;
  // The handle for a call, a reference of its own; with the GIL held.
  std::shared_ptr<zo2_model> use() const {
    if (!m) invalid("the model is closed");
    return m;
  }
  zo2_model* get() const { return use().get(); }  // for a call that keeps the GIL
  void close() { m.reset(); }
};

// A path made absolute against the working directory now, without "." components, as
// zo2_model_load holds the model's directory (zo2.h): Model.path is the directory the
// sessions will read, whatever os.chdir comes later.
std::string absolute_path(const std::string& path) {
  std::error_code ec;
  const std::filesystem::path abs = std::filesystem::absolute(path, ec);
  if (ec) return path;  // (no working directory: zo2_model_load says so)
  std::filesystem::path out;
  for (const auto& part : abs)
    if (part != "." && !part.empty()) out /= part;
  return out.string();
}

std::unique_ptr<Model> load_model(py::handle dir, bool check_weights) {
  auto model = std::make_unique<Model>();
  model->path = path_string(dir, "model");
  zo2_model_params mp = zo2_model_default_params();
  mp.check_weights = check_weights ? 1 : 0;
  int rc;
  std::string message;
  zo2_model* handle = nullptr;
  {
    NoGil nogil;
    rc = zo2_model_load(model->path.c_str(), &mp, &handle);
    if (rc != 0) message = zo2_last_error();
  }
  if (rc != 0) raise_status(rc, message);
  model->m = std::shared_ptr<zo2_model>(handle, zo2_model_free);
  model->path = absolute_path(model->path);  // (its messages name the path as given)
  return model;
}

// ---------------------------------------------------------------------------------------
// Session parameters: keyword arguments <-> zo2_session_params, with the strings owned.

struct Params {
  zo2_session_params p = zo2_session_default_params();
  std::string device = "cpu", storage = "fp32", compute = "fp32", save_dtype = "fp32";
  std::string optimizer = "zo-sgd", difference = "central", state_dtype = "fp32", lora_targets = "q_proj,v_proj";
  std::string kv_cache = "auto";
  std::optional<std::string> seed_log, adapter, parallel, disk_dir;
  // The paths as the session uses them, for .params: made absolute against the working
  // directory when the session was opened (absolute_paths()), as Model.path is, so that a
  // later os.chdir does not make .params name another file (the C API holds them so too).
  std::optional<std::string> seed_log_abs, adapter_abs, disk_dir_abs;
  void absolute_paths() {
    auto abs = [](const std::optional<std::string>& p) {
      return p ? std::optional<std::string>(absolute_path(*p)) : std::nullopt;
    };
    seed_log_abs = abs(seed_log), adapter_abs = abs(adapter), disk_dir_abs = abs(disk_dir);
  }
  void fix_pointers() {
    p.disk_dir = disk_dir ? disk_dir->c_str() : nullptr;
    p.parallel = parallel ? parallel->c_str() : nullptr;
    p.optimizer = optimizer.c_str();
    p.difference = difference.c_str();
    p.state_dtype = state_dtype.c_str();
    p.lora_targets = lora_targets.c_str();
    p.adapter_path = adapter ? adapter->c_str() : nullptr;
    p.device = device.c_str();
    p.storage_dtype = storage.c_str();
    p.compute_dtype = compute.c_str();
    p.save_dtype = save_dtype.c_str();
    p.seed_log_path = seed_log ? seed_log->c_str() : nullptr;
    p.kv_cache = kv_cache.c_str();
  }
};

const char* const kParamNames[] = {"lr",           "eps",          "weight_decay",  "seed",       "device",
                                   "gpu_mem",      "offload",      "window",        "storage_dtype",
                                   "compute_dtype", "n_threads",   "max_seqs",      "max_seq_len",
                                   "training",     "seed_log",     "seed_log_append", "first_step",
                                   "save_dtype",   "save_shard_size", "optimizer",  "directions",
                                   "difference",   "momentum",     "beta1",         "beta2",      "adam_eps",
                                   "state_dtype",  "resume_state", "lora_r",       "lora_alpha",    "lora_targets",
                                   "adapter",      "prefix_tokens", "generate_seqs", "kv_cache",      "prefill_chunk",
                                   "parallel",     "rank_timeout", "share_host_image", "sliced_upload",
                                   "host_mem",     "disk_dir",     "disk_lag",      "disk_staging", "tile"};

// An int, or an integer type with __index__ (numpy's np.int64, np.uint32, ...), as Python's
// operator.index takes it; never a bool (nor numpy's, whose __index__ numpy 1.x still has).
py::object index_arg(py::handle v, const char* name) {
  if (py::isinstance<py::bool_>(v) || type_name(v).starts_with("numpy.bool"))
    wrong_type(std::string(name) + " must be an int, not " + type_name(v) + " (" + py::repr(v).cast<std::string>() + ")");
  if (py::isinstance<py::int_>(v)) return py::reinterpret_borrow<py::object>(v);
  PyObject* i = PyNumber_Index(v.ptr());
  if (!i) {
    PyErr_Clear();
    wrong_type(std::string(name) + " must be an int, not " + type_name(v) + " (" + py::repr(v).cast<std::string>() + ")");
  }
  return py::reinterpret_steal<py::object>(i);
}

int64_t int_arg(py::handle v_in, const char* name) {
  const py::object v = index_arg(v_in, name);
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0) invalid(std::string(name) + " " + py::repr(v).cast<std::string>() + " is out of range");
  return x;
}

int32_t int32_arg(py::handle v, const char* name) {
  const int64_t x = int_arg(v, name);
  if (x < std::numeric_limits<int32_t>::min() || x > std::numeric_limits<int32_t>::max())
    invalid(std::string(name) + " " + std::to_string(x) + " is out of range");
  return static_cast<int32_t>(x);
}

// An unsigned 64-bit seed: an int in [0, 2^64).
uint64_t seed_arg(py::handle v_in, const char* name) {
  const py::object v = index_arg(v_in, name);
  const unsigned long long s = PyLong_AsUnsignedLongLong(v.ptr());
  if (s == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    invalid(std::string(name) + " " + py::repr(v).cast<std::string>() + " is outside [0, 2^64)");
  }
  return s;
}

// A real number: a float or an int, or any other real number Python's float() takes —
// numpy's scalars (np.float32(1e-3) from np.logspace(..., dtype=np.float32), np.int64),
// fractions.Fraction, decimal.Decimal, a 0-d tensor. Never a bool (nor numpy's), a complex
// number (np.complex128 has __float__, which drops the imaginary part), a str, or an array.
double real_arg(py::handle v, const char* name) {
  auto refuse = [&]() {
    wrong_type(std::string(name) + " must be a number, not " + type_name(v) + " (" + py::repr(v).cast<std::string>() + ")");
  };
  if (py::isinstance<py::bool_>(v) || type_name(v).starts_with("numpy.bool")) refuse();
  if (py::isinstance<py::float_>(v)) return PyFloat_AsDouble(v.ptr());  // (a float subclass: np.float64)
  if (!py::isinstance<py::int_>(v)) {
    static py::object* types = nullptr;  // leaked on purpose, as error_class's table
    if (!types) {
      py::module_ numbers = py::module_::import("numbers");
      types = new py::object(py::make_tuple(numbers.attr("Real"), numbers.attr("Complex")));
    }
    const bool real = PyObject_IsInstance(v.ptr(), PyTuple_GET_ITEM(types->ptr(), 0)) == 1;
    const bool complex = PyObject_IsInstance(v.ptr(), PyTuple_GET_ITEM(types->ptr(), 1)) == 1;
    PyErr_Clear();
    if (!real && (complex || py::isinstance<py::str>(v) || py::isinstance<py::array>(v) ||
                  !py::hasattr(v, "__float__")))
      refuse();
  }
  const double x = PyFloat_AsDouble(v.ptr());  // float(v): an int through its exact value
  if (x == -1.0 && PyErr_Occurred()) {
    if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
      PyErr_Clear();
      invalid(std::string(name) + " " + py::repr(v).cast<std::string>() + " is out of range");
    }
    PyErr_Clear();
    refuse();
  }
  return x;
}

// A float32 field: a finite value beyond float32's range (1e60) is refused as written, not as
// the inf it would narrow to ("adam_eps inf" names a value nobody gave).
float float32_arg(py::handle v, const char* name) {
  const double x = real_arg(v, name);
  if (std::isfinite(x) && !std::isfinite(static_cast<float>(x)))
    invalid(std::string(name) + " " + py::repr(v).cast<std::string>() +
            " is beyond float32's range (about 3.4e38), which zo2 stores it in");
  return static_cast<float>(x);
}

std::string str_arg(py::handle v, const char* name) {
  if (!py::isinstance<py::str>(v))
    wrong_type(std::string(name) + " must be a str, not " + type_name(v) + " (" + py::repr(v).cast<std::string>() + ")");
  Py_ssize_t size = 0;
  const char* utf8 = PyUnicode_AsUTF8AndSize(v.ptr(), &size);
  if (!utf8) {  // a lone surrogate ("a\udcff"): not text UTF-8 can spell
    PyErr_Clear();
    invalid(std::string(name) + " " + py::repr(v).cast<std::string>() +
            " is not valid Unicode text (it holds a lone surrogate, e.g. from a non-UTF-8 file name)");
  }
  std::string s(utf8, static_cast<size_t>(size));
  check_no_nul(s, name);
  return s;
}

// Parses a keyword's string with api/options.cpp's parser `parse`, whose messages name the
// C API's field (gpu_mem_bytes): they name the keyword (gpu_mem) instead.
// The C locale on the calling thread while it lives (uselocale; Note [The C locale for parsing]).
struct CLocale {
  locale_t c = newlocale(LC_ALL_MASK, "C", static_cast<locale_t>(0));
  locale_t previous = c ? uselocale(c) : static_cast<locale_t>(0);
  CLocale() = default;
  CLocale(const CLocale&) = delete;
  CLocale& operator=(const CLocale&) = delete;
  ~CLocale() {
    if (!c) return;
    uselocale(previous);
    freelocale(c);
  }
};

template <class F>
auto parse_keyword(const char* name, zo2::Opt opt, F&& parse) -> decltype(parse()) {
  return cxx_call([&] {
    try {
      return parse();
    } catch (const zo2::Error& e) {
      std::string m = e.what();
      const std::string c_name = zo2::option_name(opt, zo2::OptionSource::c_api);
      if (m.rfind(c_name, 0) == 0) m = std::string(name) + m.substr(c_name.size());
      throw zo2::Error(e.kind(), m);
    }
  });
}

// A byte size: an int, or a string as zo2-tune's flags take it ("512M", "4G"; K/M/G/T are
// powers of 1024), parsed by the same code (api/options.cpp).
uint64_t size_arg(py::handle v, const char* name, zo2::Opt opt) {
  if (py::isinstance<py::str>(v)) {
    const std::string text = v.cast<std::string>();
    return parse_keyword(name, opt, [&] {
      return static_cast<uint64_t>(zo2::parse_size_option(opt, text, zo2::OptionSource::c_api));
    });
  }
  const int64_t x = int_arg(v, name);
  if (x < 0) invalid(std::string(name) + " " + std::to_string(x) + " is negative");
  return static_cast<uint64_t>(x);
}

Params parse_params(const py::kwargs& kw) {
  Params P;
  std::vector<std::string> rule_keys;  // the update rule's own keywords given (checked below, as the CLI's flags)
  for (auto item : kw) {
    const std::string key = item.first.cast<std::string>();
    py::handle v = item.second;
    const char* k = key.c_str();
    if (key == "lr" || key == "eps" || key == "weight_decay") {
      const double x = real_arg(v, k);
      // Out of a float's range as written (1e39), not as the inf it would narrow to.
      const zo2::Opt opt = key == "lr" ? zo2::Opt::lr : key == "eps" ? zo2::Opt::eps : zo2::Opt::weight_decay;
      if (std::isfinite(x) && !std::isfinite(static_cast<float>(x)))
        cxx_call([&] { zo2::check_real(opt, x, zo2::OptionSource::c_api); });
      (key == "lr" ? P.p.lr : key == "eps" ? P.p.eps : P.p.weight_decay) = static_cast<float>(x);
    } else if (key == "seed") {
      P.p.seed = seed_arg(v, k);
    } else if (key == "device") {
      P.device = str_arg(v, k);
    } else if (key == "gpu_mem") {
      P.p.gpu_mem_bytes = v.is_none() ? 0 : size_arg(v, k, zo2::Opt::gpu_mem);
    } else if (key == "offload") {
      const std::string o = str_arg(v, k);
      if (o == "auto") P.p.offload = ZO2_OFFLOAD_AUTO;
      else if (o == "all") P.p.offload = ZO2_OFFLOAD_ALL;
      else if (o == "none") P.p.offload = ZO2_OFFLOAD_NONE;
      else invalid("offload '" + o + "' is not one of auto, all, none");
    } else if (key == "window") {
      P.p.window = int32_arg(v, k);
    } else if (key == "storage_dtype") {
      P.storage = str_arg(v, k);
    } else if (key == "compute_dtype") {
      P.compute = str_arg(v, k);
    } else if (key == "n_threads") {
      P.p.n_threads = int32_arg(v, k);
    } else if (key == "max_seqs") {
      P.p.max_seqs = int32_arg(v, k);
    } else if (key == "max_seq_len") {
      P.p.max_seq_len = int32_arg(v, k);
    } else if (key == "training") {
      if (!py::isinstance<py::bool_>(v)) wrong_type("training must be a bool, not " + type_name(v));
      P.p.training = v.cast<bool>() ? 1 : 0;
    } else if (key == "parallel") {
      if (v.is_none()) P.parallel.reset();
      else P.parallel = str_arg(v, k);
      if (P.parallel && P.parallel->empty()) invalid("parallel is empty (use None for the default)");
    } else if (key == "rank_timeout") {
      P.p.rank_timeout_s = real_arg(v, k);
    } else if (key == "share_host_image" || key == "sliced_upload") {
      if (!py::isinstance<py::bool_>(v)) wrong_type(key + " must be a bool, not " + type_name(v));
      (key == "sliced_upload" ? P.p.sliced_upload : P.p.share_host_image) = v.cast<bool>() ? 1 : 0;
    } else if (key == "host_mem") {
      P.p.host_mem_bytes = v.is_none() ? 0 : size_arg(v, k, zo2::Opt::host_mem);
    } else if (key == "disk_dir") {
      if (v.is_none()) P.disk_dir.reset();
      else P.disk_dir = path_string(v, k);
    } else if (key == "disk_lag") {
      P.p.disk_lag = int32_arg(v, k);
    } else if (key == "disk_staging") {
      P.p.disk_staging = int32_arg(v, k);
    } else if (key == "tile") {
      // Note [Sub-block streaming]: "auto", "off", bytes or a size string ("64M").
      if (py::isinstance<py::str>(v)) {
        const std::string text = v.cast<std::string>();
        P.p.tile_bytes = parse_keyword(k, zo2::Opt::tile, [&] {
          return static_cast<int64_t>(zo2::parse_tile_option(text, zo2::OptionSource::c_api));
        });
      } else {
        // Bytes: 0 is "auto"; a negative count is no size (the C field's -1 is spelled "off").
        const int64_t x = int_arg(v, k);
        if (x < 0)
          invalid("tile " + std::to_string(x) + " is negative: tile takes \"auto\", \"off\", bytes or a size "
                  "string (\"64M\")");
        P.p.tile_bytes = x;
      }
    } else if (key == "seed_log") {
      if (v.is_none()) P.seed_log.reset();
      else P.seed_log = path_string(v, k);
    } else if (key == "seed_log_append") {
      if (!py::isinstance<py::bool_>(v)) wrong_type("seed_log_append must be a bool, not " + type_name(v));
      P.p.seed_log_append = v.cast<bool>() ? 1 : 0;
    } else if (key == "first_step") {
      P.p.first_step = int_arg(v, k);
    } else if (key == "save_dtype") {
      P.save_dtype = str_arg(v, k);
    } else if (key == "save_shard_size") {
      P.p.save_shard_bytes = size_arg(v, k, zo2::Opt::shard_size);
    } else if (key == "optimizer") {
      P.optimizer = str_arg(v, k);
    } else if (key == "directions") {
      P.p.directions = int32_arg(v, k);
    } else if (key == "difference") {
      P.difference = str_arg(v, k);
    } else if (key == "momentum" || key == "beta1" || key == "beta2" || key == "adam_eps") {
      rule_keys.push_back(key);
      const float x = float32_arg(v, k);
      (key == "momentum" ? P.p.momentum : key == "beta1" ? P.p.beta1 : key == "beta2" ? P.p.beta2 : P.p.adam_eps) = x;
    } else if (key == "state_dtype") {
      rule_keys.push_back(key);
      P.state_dtype = str_arg(v, k);
    } else if (key == "prefix_tokens") {
      P.p.prefix_tokens = int32_arg(v, k);
    } else if (key == "generate_seqs") {
      P.p.generate_seqs = int32_arg(v, k);
    } else if (key == "kv_cache") {
      P.kv_cache = str_arg(v, k);
    } else if (key == "prefill_chunk") {
      P.p.prefill_chunk = int32_arg(v, k);
    } else if (key == "lora_r") {
      P.p.lora_r = int32_arg(v, k);
    } else if (key == "lora_alpha") {
      P.p.lora_alpha = float32_arg(v, k);
    } else if (key == "lora_targets") {
      if (py::isinstance<py::list>(v) || py::isinstance<py::tuple>(v)) {
        std::string joined;
        for (auto item : v) joined += (joined.empty() ? "" : ",") + str_arg(item, k);
        P.lora_targets = joined;
      } else {
        P.lora_targets = str_arg(v, k);
      }
    } else if (key == "adapter") {
      if (v.is_none()) P.adapter.reset();
      else P.adapter = path_string(v, k);
    } else if (key == "resume_state") {
      if (!py::isinstance<py::bool_>(v)) wrong_type("resume_state must be a bool, not " + type_name(v));
      P.p.resume_state = v.cast<bool>() ? 1 : 0;
    } else {
      std::string names;
      for (const char* n : kParamNames) names += std::string(names.empty() ? "" : ", ") + n;
      PyErr_SetString(PyExc_TypeError, ("unknown session parameter '" + key + "' (the parameters: " + names + ")").c_str());
      throw py::error_already_set();
    }
  }
  // A rule's keyword given for a rule without it would be ignored without a word: refused,
  // as zo2-tune's flags are (tools/cli.cpp, RuleFlags::config).
  const std::string& opt = P.optimizer;
  const bool has_state = opt == "zo-sgd-momentum" || opt == "zo-adam";
  for (const std::string& key : rule_keys) {
    if (!has_state && (opt == "zo-sgd" || opt == "zo-sgd-sign" || opt == "zo-sgd-cons"))
      invalid(key + " applies to optimizer " +
              (key == "momentum"    ? std::string("zo-sgd-momentum")
               : key == "state_dtype" ? std::string("zo-sgd-momentum or zo-adam")
                                      : std::string("zo-adam")) +
              ", not '" + opt + "'");
    if ((opt == "zo-sgd-momentum" && key != "momentum" && key != "state_dtype") ||
        (opt == "zo-adam" && key == "momentum"))
      invalid(key + " does not apply to optimizer '" + opt + "'");
  }
  return P;  // the caller calls fix_pointers() once P is where it stays
}

py::dict params_dict(const Params& P) {
  py::dict d;
  d["lr"] = P.p.lr;
  d["eps"] = P.p.eps;
  d["weight_decay"] = P.p.weight_decay;
  d["seed"] = P.p.seed;
  d["device"] = P.device;
  d["gpu_mem"] = P.p.gpu_mem_bytes == 0 ? py::object(py::none()) : py::object(py::int_(P.p.gpu_mem_bytes));
  d["offload"] = P.p.offload == ZO2_OFFLOAD_ALL ? "all" : P.p.offload == ZO2_OFFLOAD_NONE ? "none" : "auto";
  d["window"] = P.p.window;
  d["storage_dtype"] = P.storage;
  d["compute_dtype"] = P.compute;
  d["n_threads"] = P.p.n_threads;
  d["max_seqs"] = P.p.max_seqs;
  d["max_seq_len"] = P.p.max_seq_len;
  d["training"] = P.p.training != 0;
  auto path_or_none = [](const std::optional<std::string>& abs, const std::optional<std::string>& given) {
    const std::optional<std::string>& p = abs ? abs : given;
    return p ? py::object(fs_text(*p)) : py::object(py::none());
  };
  d["seed_log"] = path_or_none(P.seed_log_abs, P.seed_log);
  d["seed_log_append"] = P.p.seed_log_append != 0;
  d["first_step"] = P.p.first_step;
  d["save_dtype"] = P.save_dtype;
  d["save_shard_size"] = P.p.save_shard_bytes;
  d["optimizer"] = P.optimizer;
  d["directions"] = P.p.directions;
  d["difference"] = P.difference;
  d["momentum"] = P.p.momentum;
  d["beta1"] = P.p.beta1;
  d["beta2"] = P.p.beta2;
  d["adam_eps"] = P.p.adam_eps;
  d["state_dtype"] = P.state_dtype;
  d["resume_state"] = P.p.resume_state != 0;
  d["prefix_tokens"] = P.p.prefix_tokens;
  d["lora_r"] = P.p.lora_r;
  d["lora_alpha"] = P.p.lora_alpha;
  d["lora_targets"] = P.lora_targets;
  d["adapter"] = path_or_none(P.adapter_abs, P.adapter);
  d["generate_seqs"] = P.p.generate_seqs;
  d["kv_cache"] = P.kv_cache;
  d["prefill_chunk"] = P.p.prefill_chunk;
  d["parallel"] = P.parallel ? py::object(py::str(*P.parallel)) : py::object(py::none());
  d["rank_timeout"] = P.p.rank_timeout_s;
  d["share_host_image"] = P.p.share_host_image != 0;
  d["sliced_upload"] = P.p.sliced_upload != 0;
  // None = no cap, as it was passed (and as gpu_mem reads back), not the C field's 0.
  d["host_mem"] = P.p.host_mem_bytes == 0 ? py::object(py::none()) : py::object(py::int_(P.p.host_mem_bytes));
  d["disk_dir"] = path_or_none(P.disk_dir_abs, P.disk_dir);
  d["disk_lag"] = P.p.disk_lag;
  d["disk_staging"] = P.p.disk_staging;
  d["tile"] = P.p.tile_bytes == 0 ? py::object(py::str("auto"))
              : P.p.tile_bytes < 0 ? py::object(py::str("off")) : py::object(py::int_(P.p.tile_bytes));
  return d;
}

// ---------------------------------------------------------------------------------------
// Plan and step results

struct StepResult {
  float loss_plus = 0, loss_minus = 0, projected_grad = 0;
  int64_t step = 0;
  double loss = 0;  // L(θ): loss_minus with the forward difference, else ½(L+ + L−) (as zo2-tune reports it)
};

py::dict plan_dict(const zo2_plan_result& r) {
  py::dict d;
  d["cap_bytes"] = r.cap_bytes;
  d["device_bytes"] = r.device_bytes;
  d["minimum_cap_bytes"] = r.minimum_cap_bytes;
  d["n_blocks"] = r.n_blocks;
  d["n_resident"] = r.n_resident;
  d["n_streamed"] = r.n_streamed;
  d["window"] = r.window;
  d["block_bytes"] = r.block_bytes;
  d["globals_bytes"] = r.globals_bytes;
  d["h2d_bytes_per_step"] = r.h2d_bytes_per_step;
  d["d2h_bytes_per_step"] = r.d2h_bytes_per_step;
  d["predicted_transfer_s"] = r.predicted_transfer_s;
  d["host_bytes"] = r.host_bytes;
  d["n_disk_blocks"] = r.n_disk_blocks;
  d["disk_file_bytes"] = r.disk_file_bytes;
  d["disk_read_bytes_per_step"] = r.disk_read_bytes_per_step;
  d["disk_write_bytes_per_step"] = r.disk_write_bytes_per_step;
  d["predicted_disk_s"] = r.predicted_disk_s;
  d["tile_slots"] = r.tile_slots;
  d["tile_slot_bytes"] = r.tile_slot_bytes;
  d["tiles_per_block"] = r.tiles_per_block;
  return d;
}

py::object make_plan(const zo2_plan_result& r) {
  return py::module_::import("zo2._types").attr("Plan")(**plan_dict(r));
}

// ---------------------------------------------------------------------------------------
// Session

struct Generated {
  std::vector<int32_t> tokens;  // the new tokens (a stop id included)
  bool stopped = false;
};

// Ctrl-C during a generation: zo2_generate's progress callback (after each new token) takes
// the GIL for a moment and runs Python's signal handlers; what one raises (KeyboardInterrupt)
// stops the generation and is raised once zo2_generate has returned.
struct SignalCheck {
  PyObject *type = nullptr, *value = nullptr, *traceback = nullptr;
  static int callback(int64_t, void* user_data) {
    auto* self = static_cast<SignalCheck*>(user_data);
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() == 0) return 0;
    PyErr_Fetch(&self->type, &self->value, &self->traceback);
    return 1;
  }
  // With the GIL: raises what a handler raised, if one did.
  void raise_if_caught() {
    if (!type) return;
    PyErr_Restore(type, value, traceback);
    type = value = traceback = nullptr;
    throw py::error_already_set();
  }
};

// Signals reach Python's handlers only on the main thread: elsewhere there is nothing to check.
bool on_main_thread() {
  py::module_ threading = py::module_::import("threading");
  return threading.attr("current_thread")().is(threading.attr("main_thread")());
}

struct Session {
  zo2_session* s = nullptr;
  Params P;
  std::string model_path;
  int32_t n_vocab = 0, n_ctx = 0;  // the model's, for generate's output buffer and generate_text
  std::mutex mu;  // one call at a time (zo2.h: a session is not used from two threads at once)
  // Read without the lock (repr, closed), so they never wait for a running step with the GIL
  // held: whether close() ran, and the step index after the last call.
  std::atomic<bool> is_closed{false};
  std::atomic<int64_t> next_index{0};
  const pid_t owner = getpid();  // a fork() child: see forked()

  // In a child made by fork() (os.fork, multiprocessing's "fork") the mutex may be held by a
  // parent thread that does not exist here: nothing waits for it. The C API refuses every
  // call there and zo2_session_free leaks the child's copy (zo2.h, "fork()").
  bool forked() const { return getpid() != owner; }

  // (Nothing else runs on the session now: a call holds a reference to it. The lock is
  // taken anyway, as close does.)
  ~Session() { free_session(); }

  void close() {
    NoGil nogil;
    free_session();
  }

  // s and is_closed change with the lock held: a step waiting for it must see the session
  // closed, not the freed handle (adversarial pass 65: a use after free).
  void free_session() {
    std::unique_lock<std::mutex> lock(mu, std::defer_lock);
    if (!forked()) lock.lock();  // (in a child, zo2_session_free releases nothing)
    zo2_session_free(s);
    s = nullptr;
    is_closed = true;
  }

  // Runs `call(session)` with the GIL released and the session locked; raises on failure.
  template <class F>
  int run(F&& call, bool allow_aborted = false) {
    int rc;
    std::string message;
    {
      NoGil nogil;
      std::unique_lock<std::mutex> lock(mu, std::defer_lock);  // (after nogil: Note [The GIL at exit])
      if (!forked()) lock.lock();
      if (s && forked()) {  // (the C API refuses it too: zo2.h, "fork()")
        rc = ZO2_ERR_INVALID_ARGUMENT;
        message = "the session was created in process " + std::to_string(owner) + "; this is process " +
                  std::to_string(getpid()) + ", a forked child, which cannot use it (its worker threads exist only "
                  "in the process that created it): create a new Session in the child";
      } else if (!s) {
        rc = ZO2_ERR_INVALID_ARGUMENT;
        message = "the session is closed";
      } else {
        rc = call(s);
        if (rc < 0 || (rc > 0 && !allow_aborted)) message = zo2_last_error();
        if (!forked()) next_index = zo2_session_step_index(s);
      }
    }
    if (rc < 0) raise_status(rc, message);
    return rc;
  }

  StepResult step(py::handle ids, py::handle mask, py::handle labels, const zo2_choices* c) {
    Batch b = make_batch(ids, mask, labels);
    zo2_step_result r{};
    int64_t index = -1;
    run([&](zo2_session* s) {
      index = zo2_session_step_index(s);
      return c ? zo2_session_step_choices(s, &b.b, c, &r) : zo2_session_step(s, &b.b, &r);
    }, true);
    check_signals();
    const double loss = P.difference == "forward" ? static_cast<double>(r.loss_minus)
                                                  : 0.5 * (static_cast<double>(r.loss_plus) + r.loss_minus);
    return StepResult{r.loss_plus, r.loss_minus, r.projected_grad, index, loss};
  }

  float eval(py::handle ids, py::handle mask, py::handle labels, const zo2_choices* c) {
    Batch b = make_batch(ids, mask, labels);
    float loss = 0;
    run([&](zo2_session* s) {
      return c ? zo2_session_eval_choices(s, &b.b, c, &loss) : zo2_session_eval(s, &b.b, &loss);
    });
    check_signals();
    return loss;
  }

  // zo2_generate over `prompts` with `p` (its stop_ids set by the caller); the C API
  // validates everything (prompts, options, the session) before it runs anything.
  std::vector<Generated> generate(const std::vector<std::vector<int32_t>>& prompts, const zo2_generate_params& p) {
    if (prompts.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) invalid("too many prompts");
    const size_t n = prompts.size(), rows = std::max<size_t>(n, 1);  // never NULL: n = 0 gets the C API's message
    std::vector<const int32_t*> ptrs(rows, nullptr);
    std::vector<int32_t> lens(rows, 0), out_lens(rows, 0), stopped(rows, 0);
    for (size_t i = 0; i < n; ++i) {
      ptrs[i] = prompts[i].data();
      lens[i] = static_cast<int32_t>(prompts[i].size());
    }
    // A prompt (≥ 1 token) and max_new_tokens fit the session's positions (≤ n_ctx): a
    // larger max_new_tokens is refused before anything is written, so it needs no buffer.
    const size_t per = p.max_new_tokens >= 1 && p.max_new_tokens <= n_ctx ? static_cast<size_t>(p.max_new_tokens) : 1;
    std::vector<int32_t> out(rows * per, 0);
    zo2_generate_params params = p;
    SignalCheck signal_check;
    if (on_main_thread()) {
      params.progress_callback = &SignalCheck::callback;
      params.progress_user_data = &signal_check;
    }
    const int rc = run([&](zo2_session* s) {
      return zo2_generate(s, ptrs.data(), lens.data(), static_cast<int32_t>(n), &params, out.data(), out_lens.data(),
                          stopped.data());
    }, /*allow_aborted=*/true);
    signal_check.raise_if_caught();
    if (rc != 0) raise_status(ZO2_ERR_INTERNAL, "zo2_generate stopped without a signal");
    check_signals();
    std::vector<Generated> result(n);
    for (size_t i = 0; i < n; ++i) {
      result[i].tokens.assign(out.begin() + static_cast<std::ptrdiff_t>(i * per),
                              out.begin() + static_cast<std::ptrdiff_t>(i * per + static_cast<size_t>(out_lens[i])));
      result[i].stopped = stopped[i] != 0;
    }
    return result;
  }
};

struct Choices {
  std::vector<int32_t> sizes, labels;
  zo2_choices c{};
};

Choices make_choices(py::handle group_sizes, py::handle group_labels) {
  Choices ch;
  ch.sizes = int_list(group_sizes, "group_sizes", {"group sizes are integers", "[n_groups]"}, /*strict=*/true);
  ch.labels = int_list(group_labels, "group_labels", {"group labels are integers", "[n_groups]"}, /*strict=*/true);
  if (ch.sizes.size() != ch.labels.size())
    invalid("group_sizes has " + std::to_string(ch.sizes.size()) + " entries but group_labels has " +
            std::to_string(ch.labels.size()));
  if (ch.sizes.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) invalid("too many groups");
  ch.c.n_groups = static_cast<int32_t>(ch.sizes.size());
  ch.c.group_sizes = ch.sizes.data();
  ch.c.group_labels = ch.labels.data();
  return ch;
}

std::unique_ptr<Session> make_session(py::handle model, const py::kwargs& kw) {
  auto S = std::make_unique<Session>();
  S->P = parse_params(kw);  // the keywords first: a typo fails before anything is read
  S->P.fix_pointers();
  S->P.absolute_paths();  // (the working directory the C API reads them against, below)
  std::unique_ptr<Model> owned;
  Model* m;
  if (py::isinstance<Model>(model)) {
    m = model.cast<Model*>();
  } else {
    owned = load_model(model, true);  // a path: loaded for this session, freed right after
    m = owned.get();
  }
  S->model_path = m->path;
  // Our own reference while the GIL is released: a Model.close() meanwhile on another
  // thread frees nothing this uses (Note [A model's lifetime]).
  const std::shared_ptr<zo2_model> keep = m->use();
  zo2_model* mm = keep.get();
  S->n_vocab = zo2_model_n_vocab(mm);
  S->n_ctx = zo2_model_n_ctx(mm);
  int rc;
  std::string message;
  {
    NoGil nogil;
    rc = zo2_session_init(mm, &S->P.p, &S->s);
    if (rc != 0) message = zo2_last_error();
  }
  if (rc != 0) raise_status(rc, message);
  S->next_index = zo2_session_step_index(S->s);
  return S;
}

// ---------------------------------------------------------------------------------------
// Generation (zo2_generate): Session.generate and Session.generate_text.

// One sequence of token ids (a prompt, stop_ids): a list, tuple, 1-D array or tensor of
// integers; an empty one is an empty list (the C API names an empty prompt).
std::vector<int32_t> id_sequence(py::handle obj, const std::string& name) {
  if (py::isinstance<py::str>(obj) || py::isinstance<py::bytes>(obj))
    wrong_type(name + " is a " + type_name(obj) + ": token ids are a sequence of ints (Session.generate_text takes text)");
  if (py::isinstance<py::int_>(obj))
    wrong_type(name + " is an int, not a sequence of token ids (prompts is a list of prompts: [[ids...], ...])");
  if (!py::isinstance<py::array>(obj) && py::isinstance<py::sequence>(obj) && py::len(obj) == 0) return {};
  return int_list(obj, name.c_str());
}

// The prompts: a sequence (list, tuple, 2-D array, ...) of token-id sequences.
std::vector<std::vector<int32_t>> prompt_list(py::handle prompts) {
  if (py::isinstance<py::str>(prompts) || py::isinstance<py::bytes>(prompts) || !py::hasattr(prompts, "__iter__"))
    wrong_type("prompts must be a sequence of prompts, each a sequence of token ids (got " +
            py::repr(prompts).cast<std::string>().substr(0, 60) + ")");
  std::vector<std::vector<int32_t>> out;
  for (py::handle item : prompts) out.push_back(id_sequence(item, "prompts[" + std::to_string(out.size()) + "]"));
  return out;
}

// Generate's keyword arguments as zo2_generate_params; stop_ids point into `stop_ids`.
zo2_generate_params generate_params(py::handle max_new_tokens, py::handle greedy, py::handle temperature,
                                    py::handle top_p, py::handle seed, py::handle pad_id, py::handle stop_ids,
                                    std::vector<int32_t>& stop_storage) {
  zo2_generate_params p = zo2_generate_default_params();
  p.max_new_tokens = int32_arg(max_new_tokens, "max_new_tokens");
  if (!py::isinstance<py::bool_>(greedy)) wrong_type("greedy must be a bool, not " + type_name(greedy));
  p.greedy = greedy.cast<bool>() ? 1 : 0;
  const double t = real_arg(temperature, "temperature"), top = real_arg(top_p, "top_p");
  // Sampling's values checked as written where float32 changes them (1e39 is not inf; a
  // top_p just above 1 is not 1), as lr is; the C API checks the rest.
  if (!p.greedy && static_cast<double>(static_cast<float>(t)) != t)
    cxx_call([&] { zo2::check_real(zo2::Opt::temperature, t, zo2::OptionSource::c_api); });
  if (!p.greedy && static_cast<double>(static_cast<float>(top)) != top)
    cxx_call([&] { zo2::check_real(zo2::Opt::top_p, top, zo2::OptionSource::c_api); });
  p.temperature = static_cast<float>(t);
  p.top_p = static_cast<float>(top);
  p.seed = seed_arg(seed, "seed");
  p.pad_id = int32_arg(pad_id, "pad_id");
  if (!stop_ids.is_none()) {
    std::vector<int32_t> ids = id_sequence(stop_ids, "stop_ids");
    stop_storage.insert(stop_storage.end(), ids.begin(), ids.end());
  }
  p.stop_ids = stop_storage.empty() ? nullptr : stop_storage.data();
  p.n_stop_ids = static_cast<int32_t>(stop_storage.size());
  return p;
}

py::object make_generation(const Generated& g, py::object text) {
  py::list tokens;
  for (int32_t id : g.tokens) tokens.append(py::int_(id));
  return py::module_::import("zo2._types").attr("Generation")(tokens, py::bool_(g.stopped), text);
}

py::str utf8_text(const std::string& s) {  // invalid UTF-8 replaced by U+FFFD, as Tokenizer.decode
  PyObject* u = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
  if (!u) throw py::error_already_set();
  return py::reinterpret_steal<py::str>(u);
}

// ---------------------------------------------------------------------------------------
// train: zo2-tune's train subcommand in this process (Note [Binding]).

std::mutex g_train_mu;  // train's stop flag and signal handlers are process-wide: one run at a time
// The thread running a train (holding g_train_mu): a second train from that thread (its
// progress callback) would wait for the lock it holds, forever, so it is refused.
std::atomic<std::thread::id> g_train_thread{};

// Asks a running train to stop after its current step, as SIGINT does. Train's own handler
// is swapped out atomically and called directly, so no signal is raised: if train has
// already put SIG_DFL back (it is finishing), nothing happens. Returns whether train's
// handler was installed (false: not yet, or no longer).
bool request_train_stop(void (*python_handler)(int)) {
  struct sigaction cur{};
  if (sigaction(SIGINT, nullptr, &cur) != 0) return false;
  if ((cur.sa_flags & SA_SIGINFO) || cur.sa_handler == SIG_DFL || cur.sa_handler == SIG_IGN ||
      cur.sa_handler == python_handler)
    return false;
  struct sigaction dfl{}, old{};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  if (sigaction(SIGINT, &dfl, &old) != 0) return false;
  if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler == cur.sa_handler) {
    old.sa_handler(SIGINT);  // train's on_stop_signal: sets its stop flag
    return true;
  }
  sigaction(SIGINT, &old, nullptr);  // it changed in between (train finished): put it back
  return false;
}

struct TrainOutcome {
  int rc = 0;
  bool stopped_by_us = false;
};

int train_impl(const std::vector<std::pair<std::string, py::object>>& options, py::object on_record, bool quiet) {
  if (g_train_thread.load() == std::this_thread::get_id())
    invalid("zo2.train was called while another zo2.train runs on this thread (from its progress callback?): one "
            "train runs at a time per process, and this one would wait forever for the one that called it; start "
            "it after that zo2.train returns (or from another thread, where it waits its turn)");
  std::unique_lock<std::mutex> train_lock(g_train_mu, std::defer_lock);
  {
    NoGil nogil;
    train_lock.lock();
  }
  struct TrainThread {  // cleared before train_lock is released, on every path
    TrainThread() { g_train_thread = std::this_thread::get_id(); }
    ~TrainThread() { g_train_thread = std::thread::id(); }
    void clear() { g_train_thread = std::thread::id(); }
  } train_thread;
  // Note [The C locale for parsing]: zo2-tune runs under the C locale (it never calls
  // setlocale); a Python host may have called locale.setlocale(LC_ALL, "de_DE.UTF-8"), under
  // which CLI11's strtold read "--lr 0.001" as 0 and refused it. The parse and the run use
  // the C locale, on this thread and on the worker's.
  CLocale c_locale;
  CLI::App app{"zo2-tune"};
  CLI::App* sub = app.add_subcommand("train");
  zo2::cli::Runner runner = zo2::cli::add_train(*sub);
  zo2::cli::decimal_integer_options(app);  // as zo2-tune's (Note [Decimal integers])
  zo2::cli::non_empty_values(app);  // after, so it runs first: as zo2-tune's (Note [Empty values])
  std::vector<std::string> args{"zo2-tune", "train"};
  std::vector<std::pair<const CLI::Option*, std::string>> given;  // each flag and the keyword that gave it
  for (const auto& [name, value] : options) {
    std::string dashed = name;
    for (char& ch : dashed)
      if (ch == '_') ch = '-';
    const CLI::Option* opt = sub->get_option_no_throw("--" + dashed);
    std::string flag = "--" + dashed;
    if (!opt) opt = sub->get_option_no_throw("--" + name), flag = "--" + name;
    if (!opt || flag == "--records" || flag == "--help") {
      PyErr_SetString(PyExc_TypeError, ("train() got an unknown option '" + name +
                                        "' (the options are zo2-tune train's flags, with _ for -)").c_str());
      throw py::error_already_set();
    }
    // None is the keyword left out (train's default), as Python's optional keywords go: a
    // wrapper passes eval=eval_file_or_None (a refusal here broke such callers: the review of
    // pass 70's fixes). The docstring says so.
    if (value.is_none()) continue;
    // Two spellings of one flag (batch_size and MeZO's per_device_train_batch_size): CLI11
    // would say "At Most 1 required but received 2".
    for (const auto& [other, other_name] : given)
      if (other == opt)
        invalid("train options " + other_name + " and " + name + " are both --" + opt->get_lnames().front() +
                " (two spellings of one flag): give one");
    given.emplace_back(opt, name);
    if (py::isinstance<py::bool_>(value)) {
      if (opt->get_expected_min() != 0)
        wrong_type("train option " + name + " takes a value, not " + py::repr(value).cast<std::string>());
      if (value.cast<bool>()) {
        args.push_back(flag);
      } else if (sub->get_option_no_throw("--no-" + dashed)) {
        args.push_back("--no-" + dashed);
      }
      continue;
    }
    if (opt->get_expected_min() == 0)
      wrong_type("train option " + name + " is a flag: pass True or False, not " + type_name(value) + " (" +
                 py::repr(value).cast<std::string>() + ")");
    args.push_back(flag);
    // As the OS spells it (os.fsencode): a bytes path as is, a str path os.fsdecode made from
    // non-UTF-8 bytes back to those bytes, as zo2-tune's argv would carry them.
    py::object text = py::isinstance<py::bytes>(value) ? value : py::object(py::str(value));
    std::string arg = py::bytes(py::module_::import("os").attr("fsencode")(text)).cast<std::string>();
    check_no_nul(arg, name.c_str());
    args.push_back(std::move(arg));
  }

  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) raise_status(ZO2_ERR_IO, std::string("pipe: ") + std::strerror(errno));
  args.push_back("--records");  // train's hidden records sink (tools/cmd_train.cpp)
  args.push_back("/dev/fd/" + std::to_string(fds[1]));
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::ParseError& e) {
    close(fds[0]), close(fds[1]);
    invalid(std::string("train: ") + e.what());
  } catch (const zo2::Error& e) {
    close(fds[0]), close(fds[1]);
    raise_status(status_of(e.kind()), e.what());
  }

  struct sigaction saved_int{}, saved_term{};
  sigaction(SIGINT, nullptr, &saved_int);
  sigaction(SIGTERM, nullptr, &saved_term);
  void (*python_handler)(int) = (saved_int.sa_flags & SA_SIGINFO) ? nullptr : saved_int.sa_handler;
  const zo2::LogLevel saved_level = zo2::log_level();
  if (quiet && saved_level < zo2::LogLevel::warn) zo2::log_set_level(zo2::LogLevel::warn);

  int rc = 0;
  int err_code = 0;
  std::string err_message;
  std::atomic<bool> done{false};
  std::thread worker([&] {
    CLocale worker_locale;
    try {
      rc = runner();
    } catch (const zo2::Error& e) {
      err_code = status_of(e.kind()), err_message = e.what();
    } catch (const std::exception& e) {  // api/status.h (a refused TBB thread: Note [Thread limits])
      zo2::ExceptionStatus st = zo2::status_of_exception(e);
      err_code = st.code, err_message = std::move(st.message);
    }
    done = true;
    close(fds[1]);  // with train's own stream closed, the reader sees the end
  });

  // Read train's records on this thread; call Python for each line.
  std::optional<py::error_already_set> py_error;
  bool stop_wanted = false, stop_delivered = false;
  // The callback's stop goes through train's SIGINT handler; train's log names the callback
  // as the reason instead of signal 2 (zo2::cli::set_train_stop_reason).
  auto say_callback_stopped = [](const char* how) {
    zo2::cli::set_train_stop_reason(std::string("stopped by the progress callback (") + how + ")");
  };
  std::string buffer;
  char chunk[8192];
  bool eof = false;
  while (!eof) {
    std::vector<std::string> lines;
    {
      NoGil nogil;
      pollfd pfd{fds[0], POLLIN, 0};
      const int n = poll(&pfd, 1, 100);
      if (n > 0) {
        const ssize_t got = read(fds[0], chunk, sizeof chunk);
        if (got == 0) eof = true;
        else if (got > 0) buffer.append(chunk, static_cast<size_t>(got));
        else if (errno != EINTR && errno != EAGAIN) eof = true;
      }
      size_t pos;
      while ((pos = buffer.find('\n')) != std::string::npos) {
        lines.push_back(buffer.substr(0, pos));
        buffer.erase(0, pos + 1);
      }
      if (stop_wanted && !stop_delivered && !done) stop_delivered = request_train_stop(python_handler);
    }
    // With the GIL: Ctrl-C that reached Python's handler (before train installed its own),
    // and the records.
    if (!py_error && PyErr_CheckSignals() != 0) {
      py_error.emplace();
      stop_wanted = true;
    }
    for (const std::string& line : lines) {
      if (py_error || on_record.is_none()) continue;
      try {
        py::object keep_going = on_record(py::str(line));
        if (!keep_going.is_none() && !keep_going.cast<bool>()) {
          if (!stop_wanted) say_callback_stopped("it returned False");
          stop_wanted = true;
        }
      } catch (py::error_already_set& e) {
        // A KeyboardInterrupt here is the callback's own (raise KeyboardInterrupt, or a
        // handler of the program's raising it): a Ctrl-C during the run reaches train's
        // handler, not Python's (Note [Stop signals]). It is re-raised after the save, as
        // any exception of the callback.
        if (!stop_wanted)
          say_callback_stopped(("it raised " + py::str(e.type().attr("__name__")).cast<std::string>()).c_str());
        py_error.emplace(std::move(e));
        stop_wanted = true;
      }
    }
    if (stop_wanted && !stop_delivered && !done) {
      NoGil nogil;
      stop_delivered = request_train_stop(python_handler);
    }
  }
  {
    NoGil nogil;
    worker.join();
  }
  close(fds[0]);
  sigaction(SIGINT, &saved_int, nullptr);
  sigaction(SIGTERM, &saved_term, nullptr);
  zo2::log_set_level(saved_level);
  train_thread.clear();
  train_lock.unlock();
  if (py_error) {
    py_error->restore();
    throw py::error_already_set();
  }
  if (err_code != 0) raise_status(err_code, err_message);
  if (rc == 130 && !stop_delivered) {
    // A stop signal during the run (Note [Stop signals]): train finished its step and saved,
    // as the CLI does. A signal the program has its own Python handler for goes to that
    // handler now (train's handler stood in for it during the run, and train has put it
    // back); any other raises KeyboardInterrupt (Python's default for SIGINT).
    const int sig = zo2::cli::train_stop_signal();
    struct sigaction now {};
    if (sig > 0 && sigaction(sig, nullptr, &now) == 0 &&
        ((now.sa_flags & SA_SIGINFO) || (now.sa_handler != SIG_DFL && now.sa_handler != SIG_IGN))) {
      ::raise(sig);
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      return rc;
    }
    PyErr_SetNone(PyExc_KeyboardInterrupt);
    throw py::error_already_set();
  }
  return rc;
}

// ---------------------------------------------------------------------------------------
// Tokenizer

struct Tokenizer {
  std::shared_ptr<const zo2::Tokenizer> t;
};

// zo2-tune generate's text handling (tools/cmd_generate.cpp) around Session::generate:
// each prompt is the tokenizer's special prefix then the text's ids; the tokenizer's EOS
// stops a prompt (unless ignore_eos); padding uses its PAD (else EOS) id; the text of the
// new tokens leaves special tokens out and is cut before the first stop string. The C API
// has no stop callback, so a stop string is found after generation and the tokens are cut
// after the first token whose text contains it: the same tokens and text as the CLI's.
py::list generate_text(Session& S, const Tokenizer& T, py::handle texts, const zo2_generate_params& base,
                       std::vector<int32_t> stop_ids, py::handle stop, bool ignore_eos) {
  if (py::isinstance<py::str>(texts) || py::isinstance<py::bytes>(texts) || !py::hasattr(texts, "__iter__"))
    wrong_type("texts must be a sequence of str (one prompt: [text]), not " + type_name(texts));
  std::vector<std::string> prompts_text;
  for (py::handle item : texts) prompts_text.push_back(str_arg(item, ("texts[" + std::to_string(prompts_text.size()) + "]").c_str()));
  std::vector<std::string> stops;
  if (py::isinstance<py::str>(stop)) {
    stops.push_back(str_arg(stop, "stop"));
  } else if (!stop.is_none()) {
    if (py::isinstance<py::bytes>(stop) || !py::hasattr(stop, "__iter__"))
      wrong_type("stop must be a str or a sequence of str, not " + type_name(stop));
    for (py::handle item : stop) stops.push_back(str_arg(item, ("stop[" + std::to_string(stops.size()) + "]").c_str()));
  }
  for (const auto& s : stops)
    if (s.empty()) invalid("stop '': the stop string is empty");
  const zo2::Tokenizer& tok = *T.t;
  std::vector<std::vector<int32_t>> prompts = cxx_call([&] {
    std::vector<std::vector<int32_t>> ids;
    for (const auto& text : prompts_text) {
      std::vector<int32_t> p = tok.special_prefix();
      const auto e = tok.encode(text);
      p.insert(p.end(), e.begin(), e.end());
      ids.push_back(std::move(p));
    }
    return ids;
  });
  zo2_generate_params p = base;
  // Note [A model's end-of-sequence ids] (api/generate.h), as zo2-tune generate.
  const std::vector<int32_t> model_eos = cxx_call([&] { return zo2::model_eos_ids(S.model_path, S.n_vocab); });
  if (!ignore_eos) {
    if (tok.eos_id()) stop_ids.push_back(*tok.eos_id());
    stop_ids.insert(stop_ids.end(), model_eos.begin(), model_eos.end());
  }
  p.stop_ids = stop_ids.empty() ? nullptr : stop_ids.data();
  p.n_stop_ids = static_cast<int32_t>(stop_ids.size());
  if (tok.pad_id() && *tok.pad_id() < S.n_vocab) p.pad_id = *tok.pad_id();
  else if (tok.eos_id() && *tok.eos_id() < S.n_vocab) p.pad_id = *tok.eos_id();
  std::vector<Generated> out = S.generate(prompts, p);

  std::vector<int32_t> specials = model_eos;
  for (auto id : {tok.bos_id(), tok.eos_id(), tok.pad_id()})
    if (id) specials.push_back(*id);
  std::vector<std::string> decoded = cxx_call([&] {
    auto text_of = [&](const std::vector<int32_t>& t, size_t n, bool* cut) {
      std::vector<int32_t> kept;
      for (size_t i = 0; i < n; ++i)
        if (t[i] < tok.vocab_size() && std::find(specials.begin(), specials.end(), t[i]) == specials.end())
          kept.push_back(t[i]);
      std::string s = tok.decode(kept);
      size_t at = std::string::npos;
      for (const auto& st : stops) at = std::min(at, s.find(st));
      *cut = at != std::string::npos;
      if (at != std::string::npos) s.resize(at);
      return s;
    };
    std::vector<std::string> result;
    for (Generated& g : out) {
      bool cut = false;
      std::string s = text_of(g.tokens, g.tokens.size(), &cut);
      if (cut) {  // where generation would have stopped: the first token whose text has a stop string
        size_t n = 1;
        for (bool c = false; n < g.tokens.size(); ++n) {
          text_of(g.tokens, n, &c);
          if (c) break;
        }
        g.tokens.resize(n);
        g.stopped = true;
        s = text_of(g.tokens, n, &cut);
      }
      result.push_back(std::move(s));
    }
    return result;
  });
  py::list list;
  for (size_t i = 0; i < out.size(); ++i) list.append(make_generation(out[i], utf8_text(decoded[i])));
  return list;
}

py::object opt_id(std::optional<int32_t> id) { return id ? py::object(py::int_(*id)) : py::object(py::none()); }

}  // namespace

PYBIND11_MODULE(_zo2, m) {
  g_main_thread = py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  m.doc() = "zo2's native module (pybind11 over the C API include/zo2.h); use the package `zo2`.";
  m.attr("__version__") = zo2_version();
  m.def("version", &zo2_version, "The library's version (zo2_version()).");
  m.def("set_log_level", [](py::object level_arg) {
        const std::string level = str_arg(level_arg, "level");
        static const std::pair<const char*, zo2_log_level> levels[] = {
            {"debug", ZO2_LOG_DEBUG}, {"info", ZO2_LOG_INFO}, {"warn", ZO2_LOG_WARN},
            {"warning", ZO2_LOG_WARN}, {"error", ZO2_LOG_ERROR}, {"off", ZO2_LOG_OFF}};
        for (const auto& [name, value] : levels)
          if (level == name) return zo2_log_set_level(value);
        invalid("log level '" + level + "' is not one of debug, info, warn, error, off");
      }, py::arg("level"),
      "Process-wide: zo2's messages below `level` (debug, info, warn, error, off) are dropped. Default info.");

  py::class_<Model>(m, "Model", "An HF checkpoint directory's config (zo2_model). Weights are read by Session.")
      .def(py::init([](py::object dir, bool check_weights) { return load_model(dir, check_weights); }),
           py::arg("path"), py::arg("check_weights") = true, "The same as Model.load(path, check_weights).")
      .def_static("load", [](py::object dir, bool check_weights) { return load_model(dir, check_weights); },
                  py::arg("path"), py::arg("check_weights") = true,
                  "Reads PATH/config.json (and the safetensors headers unless check_weights=False). "
                  "A run directory resolves through its current checkpoint.")
      .def_property_readonly("path", [](const Model& x) { return fs_text(x.path); },
                             "The directory, made absolute at load (a later os.chdir changes nothing), as "
                             "os.fsdecode returns it (os.fsencode gives back its bytes).")
      .def_property_readonly("n_vocab", [](const Model& x) { return zo2_model_n_vocab(x.get()); },
                             "The vocabulary size (config.json's vocab_size; zo2_model_n_vocab).")
      .def_property_readonly("n_ctx", [](const Model& x) { return zo2_model_n_ctx(x.get()); },
                             "The context length (config.json's max_position_embeddings; zo2_model_n_ctx).")
      .def_property_readonly("n_layer", [](const Model& x) { return zo2_model_n_layer(x.get()); },
                             "The number of transformer blocks (zo2_model_n_layer).")
      .def_property_readonly("n_params", [](const Model& x) { return zo2_model_n_params(x.get()); },
                             "The number of parameters, a tied head counted once (zo2_model_n_params).")
      .def_property_readonly("closed", [](const Model& x) { return x.m == nullptr; },
                             "Whether close() ran (the properties then raise InvalidArgumentError).")
      .def("close", [](Model& x) { x.close(); },
           "Frees the model (idempotent); a Session or zo2.plan opening from it on another thread meanwhile "
           "keeps it until that call returns, and sessions opened from it stay usable.")
      .def("__enter__", [](py::object self) { return self; }, "Returns the model (use as a context manager).")
      .def("__exit__", [](Model& x, py::args) { x.close(); return false; },
           "Closes the model (close()); an exception in the with block propagates.")
      .def("__repr__", [](const Model& x) {
        if (!x.m) return py::str("<zo2.Model ") + message_text(x.path) + py::str(" (closed)>");
        return py::str("<zo2.Model ") + message_text(x.path) +
               py::str(": " + std::to_string(zo2_model_n_layer(x.m.get())) + " layers, " +
                       std::to_string(zo2_model_n_params(x.m.get())) + " parameters>");
      });

  py::class_<StepResult>(m, "StepResult", "The losses of one ZO step (zo2_step_result).")
      .def(py::init([](py::object loss_plus, py::object loss_minus, py::object projected_grad, py::object step,
                       py::object loss) {
             return StepResult{static_cast<float>(real_arg(loss_plus, "loss_plus")),
                               static_cast<float>(real_arg(loss_minus, "loss_minus")),
                               static_cast<float>(real_arg(projected_grad, "projected_grad")), int_arg(step, "step"),
                               real_arg(loss, "loss")};
           }),
           py::arg("loss_plus"), py::arg("loss_minus"), py::arg("projected_grad"), py::arg("step"), py::arg("loss"),
           "A step's result from its fields (Session.step returns them; pickle and copy rebuild them so).")
      .def_readonly("loss_plus", &StepResult::loss_plus, "mean token cross-entropy at θ + eps·z (nats)")
      .def_readonly("loss_minus", &StepResult::loss_minus,
                    "mean token cross-entropy at θ − eps·z (nats); with difference='forward', at θ")
      .def_readonly("projected_grad", &StepResult::projected_grad,
                    "(L+ − L−) / (2·eps), or (L+ − L(θ)) / eps with difference='forward'; not finite: the "
                    "update was skipped")
      .def_readonly("step", &StepResult::step, "the step's 0-based index")
      .def_readonly("loss", &StepResult::loss,
                    "the loss at θ: (loss_plus + loss_minus) / 2, or loss_minus (L(θ) itself) with "
                    "difference='forward' (as zo2-tune's progress and --log-json report it)")
      .def("__repr__", [](const StepResult& r) {
        return py::str("StepResult(step={}, loss_plus={!r}, loss_minus={!r}, projected_grad={!r})")
            .format(r.step, r.loss_plus, r.loss_minus, r.projected_grad).cast<std::string>();
      })
      // Pickled and copied (pickle with any protocol, copy, multiprocessing) as its five
      // fields, as the dataclass results (Plan, Generation, TrainResult) are: __reduce__
      // with the constructor (pybind11's py::pickle aborts the process with protocols 0 and 1).
      .def("__reduce__", [](py::object self) {
        const StepResult& r = self.cast<const StepResult&>();
        return py::make_tuple(py::type::of(self), py::make_tuple(r.loss_plus, r.loss_minus, r.projected_grad, r.step, r.loss));
      }, "(StepResult, its fields): for pickle and copy.");

  py::class_<Session>(m, "Session", R"doc(One model on one device, tuned step by step (zo2_session).

Session(model, *, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, device="cpu", gpu_mem=None,
        offload="auto", window=3, storage_dtype="fp32", compute_dtype="fp32", n_threads=0,
        max_seqs=1, max_seq_len=0, training=True, seed_log=None, seed_log_append=False,
        first_step=0, save_dtype="fp32", save_shard_size=5_000_000_000, generate_seqs=0,
        kv_cache="auto", prefill_chunk=0, parallel=None, rank_timeout=600.0,
        share_host_image=True, sliced_upload=False, host_mem=None, disk_dir=None, disk_lag=1,
        disk_staging=0, tile="auto", ...)

`model` is a zo2.Model or a checkpoint directory. Every keyword is a field of the C API's
zo2_session_params (include/zo2.h documents each), validated by the C API with its ranges
and messages; gpu_mem (gpu_mem_bytes) and save_shard_size (save_shard_bytes) take bytes or
a size string ("512M", "4G"); offload takes "auto", "all" or "none". `.params` returns
them as the session uses them (lr etc. as float32). generate_seqs > 0 makes room for
generate() (a training session too: it decodes between steps, as eval): that many prompts decode together, max_seq_len is then a
prompt's tokens plus its new ones, kv_cache places the KV cache ("auto", "device", "host",
"off") and prefill_chunk caps the prompt tokens per sequence a pass runs. Opening reads the weights into the
host block store (GIL released). Use as a context manager, or close(), to free the session
deterministically. Calls from several threads on one session are serialized; different
sessions run in parallel.)doc")
      .def(py::init([](py::object model, py::kwargs kw) { return make_session(model, kw); }), py::arg("model"),
           "Opens a session on model (a zo2.Model or a checkpoint directory) with the keyword parameters the class "
           "docstring lists (zo2_session_init); the GIL is released while the weights are read.")
      .def("step",
           [](Session& S, py::object ids, py::object mask, py::object labels) { return S.step(ids, mask, labels, nullptr); },
           py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("labels") = py::none(),
           R"doc(One ZO step (zo2_session_step): both perturbed forward passes, g = (L+ - L-)/(2 eps);
the update is deferred into the next pass. input_ids: int [n_seq, n_tokens] (or [n_tokens]) —
numpy, PyTorch CPU tensors, lists; C-contiguous int32 is used without a copy, other integer
types are converted (checked to fit int32). attention_mask: 1 = token, 0 = padding (None:
all ones). labels: transformers' unshifted labels, -100 = no loss (None: the ids where the
mask is 1). Returns a StepResult. The GIL is released while the step runs; a Ctrl-C that
arrives during it raises KeyboardInterrupt after it (the step is done and counted; the
session stays usable). An invalid batch raises InvalidArgumentError and changes nothing.)doc")
      .def("step_choices",
           [](Session& S, py::object ids, py::object sizes, py::object glabels, py::object mask, py::object labels) {
             Choices c = make_choices(sizes, glabels);
             return S.step(ids, mask, labels, &c.c);
           },
           py::arg("input_ids"), py::arg("group_sizes"), py::arg("group_labels"), py::arg("attention_mask") = py::none(),
           py::arg("labels") = py::none(),
           R"doc(A multiple-choice step with MeZO's candidate cross-entropy (zo2_session_step_choices):
the sequences are groups of group_sizes[g] consecutive candidates, the correct one at offset
group_labels[g]; label only each option's tokens (-100 elsewhere).)doc")
      .def("eval",
           [](Session& S, py::object ids, py::object mask, py::object labels) { return S.eval(ids, mask, labels, nullptr); },
           py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("labels") = py::none(),
           "Mean token cross-entropy (nats) of the current weights on the batch, unperturbed (zo2_session_eval). "
           "NaN or inf when the logits overflow (weights with huge or non-finite values): check math.isfinite.")
      .def("eval_choices",
           [](Session& S, py::object ids, py::object sizes, py::object glabels, py::object mask, py::object labels) {
             Choices c = make_choices(sizes, glabels);
             return S.eval(ids, mask, labels, &c.c);
           },
           py::arg("input_ids"), py::arg("group_sizes"), py::arg("group_labels"), py::arg("attention_mask") = py::none(),
           py::arg("labels") = py::none(), "The multiple-choice loss of the current weights (zo2_session_eval_choices).")
      .def("token_logprobs",
           [](Session& S, py::object ids, py::object mask, py::object labels) {
             Batch b = make_batch(ids, mask, labels);
             py::array_t<float> out({static_cast<py::ssize_t>(b.b.n_seq), static_cast<py::ssize_t>(b.b.n_tokens)});
             float* dst = out.mutable_data();
             S.run([&](zo2_session* s) { return zo2_session_token_logprobs(s, &b.b, dst); });
             check_signals();
             return out;
           },
           py::arg("input_ids"), py::arg("attention_mask") = py::none(), py::arg("labels") = py::none(),
           "float32 [n_seq, n_tokens]: log p(target of position t | tokens <= t) in nats, 0 where there is no "
           "target (zo2_session_token_logprobs).")
      .def("generate",
           [](Session& S, py::object prompts, py::object max_new_tokens, py::object greedy, py::object temperature,
              py::object top_p, py::object seed, py::object stop_ids, py::object pad_id) {
             std::vector<std::vector<int32_t>> ids = prompt_list(prompts);
             std::vector<int32_t> stops;
             const zo2_generate_params p =
                 generate_params(max_new_tokens, greedy, temperature, top_p, seed, pad_id, stop_ids, stops);
             py::list out;
             for (const Generated& g : S.generate(ids, p)) out.append(make_generation(g, py::none()));
             return out;
           },
           py::arg("prompts"), py::arg("max_new_tokens") = 32, py::arg("greedy") = true, py::arg("temperature") = 1.0,
           py::arg("top_p") = 1.0, py::arg("seed") = 0, py::arg("stop_ids") = py::none(), py::arg("pad_id") = 0,
           R"doc(Generates up to max_new_tokens tokens for each prompt (zo2_generate; README "Generate").
prompts: a sequence of prompts, each a non-empty sequence of token ids (lists, tuples, rows
of a 2-D array, 1-D tensors), the tokenizer's special prefix (BOS) included as the model
wants it. Needs a session opened with generate_seqs > 0 (a training session decodes with its
current weights, the pending update applied, as eval); the prompts decode generate_seqs at a time, left-padded with pad_id (masked), each new token one pass
over the blocks for the whole batch. greedy=True takes the argmax (the first of equal
logits); greedy=False samples from softmax(logits / temperature) restricted to the top_p
nucleus, token k of prompt i drawing from Philox(seed, i, k), so a seed repeats exactly.
A generated id in stop_ids ends its prompt (the id is kept). Returns one zo2.Generation
per prompt: tokens (the new ids) and stopped (a stop id ended it). The GIL is released
while it runs. A bad prompt (empty, an id outside the vocabulary, too long for max_seq_len
with max_new_tokens; named 0-based), a bad option or a session without generate_seqs raise
InvalidArgumentError and change nothing.)doc")
      .def("generate_text",
           [](Session& S, const Tokenizer& T, py::object texts, py::object max_new_tokens, py::object greedy,
              py::object temperature, py::object top_p, py::object seed, py::object stop, py::object ignore_eos) {
             if (!py::isinstance<py::bool_>(ignore_eos)) wrong_type("ignore_eos must be a bool, not " + type_name(ignore_eos));
             std::vector<int32_t> none;
             const zo2_generate_params p =
                 generate_params(max_new_tokens, greedy, temperature, top_p, seed, py::int_(0), py::none(), none);
             return generate_text(S, T, texts, p, {}, stop, ignore_eos.cast<bool>());
           },
           py::arg("tokenizer"), py::arg("texts"), py::arg("max_new_tokens") = 32, py::arg("greedy") = true,
           py::arg("temperature") = 1.0, py::arg("top_p") = 1.0, py::arg("seed") = 0, py::arg("stop") = py::none(),
           py::arg("ignore_eos") = false,
           R"doc(generate() on text, as zo2-tune generate does it: each of texts becomes the tokenizer's
special prefix (BOS) and the text's ids; the tokenizer's EOS ends a prompt (unless
ignore_eos), padding uses its PAD (else EOS) id; stop (a str or a list of str) ends a
prompt at the first token whose text contains it, the text cut before it. Returns one
zo2.Generation per text with text set: the new tokens decoded, special tokens left out
(invalid UTF-8 replaced by U+FFFD).)doc")
      .def("save",
           [](Session& S, py::object dir) {
             const std::string d = path_string(dir, "out_dir");
             S.run([&](zo2_session* s) { return zo2_session_save(s, d.c_str()); });
             // A Ctrl-C during the save is handled now, after it: say that the save is complete.
             if (PyErr_CheckSignals() != 0) {
               if (PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
                 PyErr_Clear();
                 const py::str text = py::str("interrupted during Session.save; the save into ") + message_text(d) +
                                      py::str(" completed before the interrupt was handled (the checkpoint is whole)");
                 PyErr_SetObject(PyExc_KeyboardInterrupt, text.ptr());
               }
               throw py::error_already_set();
             }
           },
           py::arg("out_dir"),
           "Writes the current weights as an HF checkpoint into the run directory out_dir, as one transaction "
           "(zo2_session_save; README \"Run directories\").")
      .def("set_lr",
           [](Session& S, py::object value) {
             const double lr = real_arg(value, "lr");  // a bool or a str is refused, as Session(lr=...) does
             if (std::isfinite(lr) && !std::isfinite(static_cast<float>(lr)))
               cxx_call([&] { zo2::check_real(zo2::Opt::lr, lr, zo2::OptionSource::c_api); });
             S.run([&](zo2_session* s) { return zo2_session_set_lr(s, static_cast<float>(lr)); });
             S.P.p.lr = static_cast<float>(lr);
           },
           py::arg("lr"), "Sets the learning rate of the following steps (zo2_session_set_lr).")
      .def_property_readonly("rank", [](Session& S) {
        int32_t rank = 0;
        S.run([&](zo2_session* s) { return zo2_session_rank(s, &rank, nullptr); });
        return rank;
      }, "This session's rank in its MPI job (0 for one process; zo2_session_rank).")
      .def_property_readonly("ranks", [](Session& S) {
        int32_t size = 1;
        S.run([&](zo2_session* s) { return zo2_session_rank(s, nullptr, &size); });
        return size;
      }, "The number of ranks of the job (1 for one process). Under mpirun every rank opens the same Session with "
         "the same parallel= layout and calls step/save/eval in the same order with the same global batch.")
      .def_property_readonly("step_index", [](Session& S) {
        int64_t i = -1;
        S.run([&](zo2_session* s) { i = zo2_session_step_index(s); return 0; });
        return i;
      }, "The index of the next step (first_step + steps done).")
      .def_property_readonly("device_peak", [](Session& S) {
        uint64_t b = 0;
        S.run([&](zo2_session* s) { b = zo2_session_device_peak(s); return 0; });
        return b;
      }, "Device arena bytes in use at the peak so far.")
      .def("plan", [](Session& S) {
        zo2_plan_result r{};
        S.run([&](zo2_session* s) { return zo2_session_plan(s, &r); });
        return make_plan(r);
      }, "The placement this session runs with (zo2.Plan).")
      .def_property_readonly("params", [](Session& S) { return params_dict(S.P); },
                             "Every session parameter as the session uses it (a dict of the keywords).")
      .def_property_readonly("model_path", [](Session& S) { return fs_text(S.model_path); },
                             "The model's directory as os.fsdecode returns it (os.fsencode gives back its bytes).")
      .def_property_readonly("closed", [](Session& S) { return S.is_closed.load(); },
                             "Whether close() ran (never waits for a running call).")
      .def("close", [](Session& S) { S.close(); },
           "Waits for outstanding work and frees the session (idempotent). An unsaved pending update is lost. "
           "In a child made by fork() it releases nothing (the child's copy of the parent's session is leaked).")
      .def("__repr__", [](Session& S) {
        // No lock: a repr never waits for a running step (the index is the last call's).
        if (S.is_closed) return py::str("<zo2.Session " ) + message_text(S.model_path) + py::str(" (closed)>");
        return py::str("<zo2.Session ") + message_text(S.model_path) +
               py::str(" on " + S.P.device + ", next step " + std::to_string(S.next_index.load()) + ">");
      })
      .def("__enter__", [](py::object self) { return self; }, "Returns the session (use as a context manager).")
      .def("__exit__", [](Session& S, py::args) {
        S.close();
        return false;
      }, "Closes the session (close()); an exception in the with block propagates.");

  m.def("_plan",
        [](py::object model, py::kwargs kw) {
          std::unique_ptr<Model> owned;
          Model* mm;
          if (py::isinstance<Model>(model)) {
            mm = model.cast<Model*>();
          } else {
            owned = load_model(model, false);
            mm = owned.get();
          }
          Params P = parse_params(kw);
          P.fix_pointers();
          zo2_plan_result r{};
          int rc;
          std::string message;
          const std::shared_ptr<zo2_model> keep = mm->use();  // Note [A model's lifetime]
          {
            NoGil nogil;
            rc = zo2_plan(keep.get(), &P.p, &r);
            if (rc != 0) message = zo2_last_error();
          }
          if (rc == ZO2_ERR_OUT_OF_MEMORY) {
            py::object cls = error_class(rc);
            py::object exc = cls(message);
            exc.attr("minimum_cap_bytes") = r.minimum_cap_bytes;
            exc.attr("n_blocks") = r.n_blocks;
            PyErr_SetObject(cls.ptr(), exc.ptr());
            throw py::error_already_set();
          }
          if (rc != 0) raise_status(rc, message);
          return make_plan(r);
        },
        py::arg("model"));

  // For python/bench/step_overhead.py: n steps through the C API in a C++ loop on this
  // session (no Python between them), timed; the reference Session.step is compared with.
  m.def("_capi_step_loop",
        [](Session& S, py::object ids, int64_t n) {
          Batch b = make_batch(ids, py::none(), py::none());
          double seconds = 0;
          S.run([&](zo2_session* s) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int64_t i = 0; i < n; ++i) {
              zo2_step_result r;
              if (const int rc = zo2_session_step(s, &b.b, &r); rc != 0) return rc;
            }
            seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            return 0;
          });
          return seconds;
        },
        py::arg("session"), py::arg("input_ids"), py::arg("n"));

  m.def("_train", &train_impl, py::arg("options"), py::arg("on_record"), py::arg("quiet"));

  // The run `train --resume DIR` without --out continues in, as zo2-tune train picks it
  // (tools/cmd_train.cpp, default_resume_out): the run whose `current` or step directory
  // DIR names, or DIR when it holds a run; None when DIR is none of these (train then says so).
  m.def("_resume_out",
        [](py::object resume) -> py::object {
          const std::string dir = path_string(resume, "resume");
          std::optional<std::string> out;
          {
            NoGil nogil;
            try {
              if (const auto run = zo2::training_run_of_checkpoint(dir); !run.empty()) out = run.string();
              else if (const auto any = zo2::run_of_checkpoint(dir); !any.empty()) out = any.string();
              else if (zo2::holds_run(dir)) out = dir;
            } catch (const std::exception&) {
              out.reset();  // (unreadable: train reports it)
            }
          }
          return out ? py::object(fs_text(*out)) : py::object(py::none());
        },
        py::arg("resume"));

  py::class_<Tokenizer>(m, "Tokenizer", R"doc(A model's tokenizer (models/tokenizer.h, what zo2-tune uses):
GPT-2 byte-level BPE, HF tokenizer.json BPE (LLaMA-3) and SentencePiece. Immutable; safe
to use from several threads.)doc")
      .def_static("from_dir",
                  [](py::object dir) {
                    const std::string d = path_string(dir, "path");
                    return Tokenizer{cxx_call([&] { return std::shared_ptr<const zo2::Tokenizer>(zo2::Tokenizer::from_dir(d)); })};
                  },
                  py::arg("path"),
                  "The tokenizer files of a model directory: tokenizer.json, else tokenizer.model, else "
                  "vocab.json + merges.txt (or encoder.json + vocab.bpe), with tokenizer_config.json's special tokens.")
      .def_static("from_files",
                  [](py::object vocab, py::object merges) {
                    const std::string v = path_string(vocab, "vocab"), mg = path_string(merges, "merges");
                    return Tokenizer{cxx_call(
                        [&] { return std::shared_ptr<const zo2::Tokenizer>(zo2::Tokenizer::from_vocab_merges(v, mg)); })};
                  },
                  py::arg("vocab"), py::arg("merges"),
                  "A GPT-2 byte-level BPE tokenizer from its two files: vocab (vocab.json or encoder.json) and merges "
                  "(merges.txt or vocab.bpe). No special-token configuration: \"<|endoftext|>\", when in the "
                  "vocabulary, is BOS and EOS (as HF's GPT-2 tokenizer), and encode adds nothing.")
      .def("encode",
           [](const Tokenizer& T, py::object text_arg, py::object special) {
             const std::string text = str_arg(text_arg, "text");
             if (!py::isinstance<py::bool_>(special))
               wrong_type("add_special_tokens must be a bool, not " + type_name(special));
             const bool add_special_tokens = special.cast<bool>();
             return cxx_call([&] { return add_special_tokens ? T.t->encode_with_special(text) : T.t->encode(text); });
           },
           py::arg("text"), py::arg("add_special_tokens") = true,
           "Token ids of text; with add_special_tokens (default, as transformers) the tokenizer's special prefix "
           "(BOS for OPT and LLaMA) and suffix are added, as zo2-tune's data readers do.")
      .def("decode",
           [](const Tokenizer& T, py::object ids, bool as_bytes) -> py::object {
             const std::vector<int32_t> v = int_list(ids, "ids");
             const std::string s = cxx_call([&] { return T.t->decode(v); });
             if (as_bytes) return py::bytes(s);
             PyObject* u = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
             if (!u) throw py::error_already_set();
             return py::reinterpret_steal<py::object>(u);
           },
           py::arg("ids"), py::arg("as_bytes") = false,
           "The text of ids (invalid UTF-8 replaced by U+FFFD; as_bytes=True returns the raw bytes).")
      .def("token_to_id",
           [](const Tokenizer& T, py::object token) { return opt_id(T.t->token_to_id(str_arg(token, "token"))); },
           py::arg("token"),
           "The id of the vocabulary's string token (byte-level form for BPE: \"\u0120the\"), or None when the "
           "vocabulary does not have it.")
      .def("id_to_token",
           [](const Tokenizer& T, py::object id_arg) {
             const int64_t wide = int_arg(id_arg, "id");
             if (wide < 0 || wide >= T.t->vocab_size())
               invalid("id_to_token: id " + std::to_string(wide) + " is not in the vocabulary (size " +
                       std::to_string(T.t->vocab_size()) + ")");
             const auto id = static_cast<int32_t>(wide);
             std::string t = cxx_call([&] { return T.t->id_to_token(id); });
             // The C++ tokenizer answers "" for an id it does not have; no vocabulary has an
             // empty token, so "" is that, said.
             if (t.empty())
               invalid("id_to_token: id " + std::to_string(id) + " is not in the vocabulary (size " +
                       std::to_string(T.t->vocab_size()) + ")");
             return t;
           },
           py::arg("id"), "The vocabulary's string for id (byte-level form for BPE: \"\u0120the\"); "
           "InvalidArgumentError for an id the vocabulary does not have.")
      .def_property_readonly("vocab_size", [](const Tokenizer& T) { return T.t->vocab_size(); },
                             "The number of ids the tokenizer has (its vocabulary and added tokens).")
      .def_property_readonly("bos_token_id", [](const Tokenizer& T) { return opt_id(T.t->bos_id()); },
                             "The beginning-of-sequence id, or None when the tokenizer has none.")
      .def_property_readonly("eos_token_id", [](const Tokenizer& T) { return opt_id(T.t->eos_id()); },
                             "The end-of-sequence id, or None when the tokenizer has none.")
      .def_property_readonly("pad_token_id", [](const Tokenizer& T) { return opt_id(T.t->pad_id()); },
                             "The padding id, or None when the tokenizer has none.")
      .def_property_readonly("kind", [](const Tokenizer& T) { return std::string(T.t->kind()); },
                             "Which tokenizer this is: \"gpt2-bpe\", \"hf-bpe\" (tokenizer.json) or \"sentencepiece\".")
      .def_property_readonly("special_prefix", [](const Tokenizer& T) { return T.t->special_prefix(); },
                             "The ids encode(add_special_tokens=True) puts first (BOS for OPT and LLaMA; [] for none).")
      .def("__repr__", [](const Tokenizer& T) {
        return "<zo2.Tokenizer " + std::string(T.t->kind()) + ", vocab " + std::to_string(T.t->vocab_size()) + ">";
      });
}
