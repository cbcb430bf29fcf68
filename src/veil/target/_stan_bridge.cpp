// veil's bridge to one compiled Stan model: a Python extension that keeps a model instance
// (its data read once) and evaluates log density, gradient and constraining map on batches of
// unconstrained points. Compiled by veil._stan together with the C++ that stanc (shipped in
// the httpstan wheel) generates for the program; that file is #included first, as MODEL_CPP.
//
// Why not httpstan's own extension: its log_prob_grad rebuilds the model from its data on
// every call (milliseconds on a model with a few thousand rows), and it is built to be called
// from the thread that created it. Stan's autodiff tape is thread-local when STAN_THREADS is
// set (httpstan's headers and TBB expect it), so every entry point below makes sure the
// calling thread has a tape: JAX runs host callbacks on its own threads.

#include MODEL_CPP

#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <stan/io/json/json_data.hpp>
#include <stan/model/log_prob_grad.hpp>
#include <stan/model/model_base.hpp>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
using array_t = py::array_t<double, py::array::c_style | py::array::forcecast>;

namespace {

// One autodiff tape per calling thread, made on the thread's first call (BridgeStan does the
// same); without it a call from a thread other than the first one dereferences a null tape.
void ensure_tape() { static thread_local stan::math::ChainableStack tape; }

class Model {
 public:
  Model(const std::string& data_json, unsigned int seed) {
    ensure_tape();
    std::istringstream in(data_json);
    stan::json::json_data data(in);
    std::ostringstream msg;
    model_ = &new_model(data, seed, &msg);
    rng_ = stan::rng_t(seed);
  }
  ~Model() { delete model_; }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  std::string name() const { return model_->model_name(); }
  std::size_t dim() const { return model_->num_params_r(); }

  std::vector<std::string> unconstrained_names() const {
    std::vector<std::string> names;
    model_->unconstrained_param_names(names, false, false);
    return names;
  }

  // Parameter and transformed-parameter names and shapes, in write_array's order.
  std::pair<std::vector<std::string>, std::vector<std::vector<std::size_t>>> variables() const {
    std::vector<std::string> names;
    std::vector<std::vector<std::size_t>> dims;
    model_->get_param_names(names, true, false);
    model_->get_dims(dims, true, false);
    return {names, dims};
  }

  std::size_t num_constrained() const {
    std::vector<std::string> names;
    model_->constrained_param_names(names, true, false);
    return names.size();
  }

  // log p(z) with Stan's normalising constants and the log-Jacobian of the constraining
  // transforms, and its gradient, for each row of z (batch, dim). A row where Stan throws
  // (an argument outside a distribution's support, say) gets log p = -inf and a NaN gradient,
  // and is counted: veil's loop reports non-finite values rather than stopping on them. The
  // model's print() statements go nowhere.
  py::tuple log_density_grad(array_t z) {
    ensure_tape();
    auto in = z.unchecked<2>();
    const py::ssize_t batch = in.shape(0), d = in.shape(1);
    check_dim(d);
    array_t lp(py::array::ShapeContainer{batch});
    array_t grad({batch, d});
    auto lp_out = lp.mutable_unchecked<1>();
    auto grad_out = grad.mutable_unchecked<2>();
    Eigen::VectorXd x(d), g(d);
    for (py::ssize_t b = 0; b < batch; ++b) {
      for (py::ssize_t i = 0; i < d; ++i) x(i) = in(b, i);
      double value;
      try {
        value = stan::model::log_prob_grad<false, true>(*model_, x, g, nullptr);
      } catch (const std::exception& e) {
        note_error(e);
        value = -std::numeric_limits<double>::infinity();
        g.setConstant(std::numeric_limits<double>::quiet_NaN());
      }
      lp_out(b) = value;
      for (py::ssize_t i = 0; i < d; ++i) grad_out(b, i) = g(i);
    }
    return py::make_tuple(lp, grad);
  }

  // The same log density without its gradient (a double-only evaluation, no tape).
  array_t log_density(array_t z) {
    ensure_tape();
    auto in = z.unchecked<2>();
    const py::ssize_t batch = in.shape(0), d = in.shape(1);
    check_dim(d);
    array_t lp(py::array::ShapeContainer{batch});
    auto lp_out = lp.mutable_unchecked<1>();
    Eigen::VectorXd x(d);
    for (py::ssize_t b = 0; b < batch; ++b) {
      for (py::ssize_t i = 0; i < d; ++i) x(i) = in(b, i);
      try {
        lp_out(b) = model_->log_prob_jacobian(x, nullptr);
      } catch (const std::exception& e) {
        note_error(e);
        lp_out(b) = -std::numeric_limits<double>::infinity();
      }
    }
    return lp;
  }

  // Constrained parameters and transformed parameters (Stan's column-major order), per row;
  // NaN where Stan throws (a transformed parameter's declared constraint fails, say).
  array_t constrain(array_t z) {
    ensure_tape();
    auto in = z.unchecked<2>();
    const py::ssize_t batch = in.shape(0), d = in.shape(1);
    check_dim(d);
    const py::ssize_t m = static_cast<py::ssize_t>(num_constrained());
    array_t out({batch, m});
    auto o = out.mutable_unchecked<2>();
    Eigen::VectorXd x(d), c(m);
    for (py::ssize_t b = 0; b < batch; ++b) {
      for (py::ssize_t i = 0; i < d; ++i) x(i) = in(b, i);
      try {
        model_->write_array(rng_, x, c, true, false, nullptr);
      } catch (const std::exception& e) {
        note_error(e);
        c.setConstant(std::numeric_limits<double>::quiet_NaN());
      }
      for (py::ssize_t i = 0; i < m; ++i) o(b, i) = c(i);
    }
    return out;
  }

  // The inverse of constrain for the parameters alone (flat, Stan's order).
  array_t unconstrain(array_t values) {
    ensure_tape();
    auto in = values.unchecked<1>();
    Eigen::VectorXd c(in.shape(0)), x;
    for (py::ssize_t i = 0; i < in.shape(0); ++i) c(i) = in(i);
    std::ostringstream msg;
    model_->unconstrain_array(c, x, &msg);
    array_t out(py::array::ShapeContainer{static_cast<py::ssize_t>(x.size())});
    auto o = out.mutable_unchecked<1>();
    for (py::ssize_t i = 0; i < x.size(); ++i) o(i) = x(i);
    return out;
  }

  std::size_t errors() const { return errors_; }
  std::string last_error() const { return last_error_; }

 private:
  void check_dim(py::ssize_t d) const {
    if (static_cast<std::size_t>(d) != model_->num_params_r())
      throw std::invalid_argument("expected points with " + std::to_string(model_->num_params_r()) +
                                  " unconstrained coordinates, got " + std::to_string(d));
  }
  void note_error(const std::exception& e) {
    ++errors_;
    last_error_ = e.what();
  }

  stan::model::model_base* model_;
  stan::rng_t rng_;
  std::size_t errors_ = 0;
  std::string last_error_;
};

}  // namespace

PYBIND11_MODULE(VEIL_MODULE, m) {
  py::class_<Model>(m, "Model")
      .def(py::init<const std::string&, unsigned int>(), py::arg("data_json"), py::arg("seed"))
      .def("name", &Model::name)
      .def("dim", &Model::dim)
      .def("unconstrained_names", &Model::unconstrained_names)
      .def("variables", &Model::variables)
      .def("log_density_grad", &Model::log_density_grad)
      .def("log_density", &Model::log_density)
      .def("constrain", &Model::constrain)
      .def("unconstrain", &Model::unconstrain)
      .def("errors", &Model::errors)
      .def("last_error", &Model::last_error);
}
