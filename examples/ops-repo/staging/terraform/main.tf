# Runs offline: terraform_data is built into Terraform (1.4 and later), so `terraform init`
# downloads nothing. The state is local; its path comes from bitops.config.yaml
# (cli.backend-config), outside the run's working copy, which is removed after each run.
terraform {
  required_version = ">= 1.4"
  backend "local" {}
}

variable "environment" {
  type    = string
  default = "staging"
}

resource "terraform_data" "app" {
  input = {
    name        = "example-app-${var.environment}"
    replicas    = 2
    environment = var.environment
  }
}

resource "terraform_data" "release" {
  input = "1.4.2"
}

output "app_name" {
  value = terraform_data.app.output.name
}

output "replicas" {
  value = terraform_data.app.output.replicas
}

output "image_tag" {
  value = terraform_data.release.output
}
